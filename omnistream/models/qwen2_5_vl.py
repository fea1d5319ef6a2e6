"""Qwen2.5-VL on our own runtime: LLM decoder over a paged KV cache + the vision tower.

The decoder works on a flat batch of N tokens from many sequences (no padding): embeddings
(N, hidden) -> layers -> final norm. Media placeholder rows of the embedding are replaced by
vision-tower outputs before the first layer. Parameter names follow the hub checkpoints
(`model.layers.*`, `visual.*`, `lm_head`), with q/k/v and gate/up packed (see
`packed_modules_mapping`).
"""

from __future__ import annotations

import math
from typing import Generator

import torch
from torch import nn

from omnistream.layers.attention import AttentionMetadata, paged_attention, write_kv
from omnistream.layers.linear import MergedLinear, SwiGLU
from omnistream.layers.norm import RMSNorm
from omnistream.layers.fused import rope_qk
from omnistream.layers.rotary import MRotaryEmbedding
from omnistream.media.item import MediaItem
from omnistream.media.patchify import normalize_rows
from omnistream.models.hf_config import QwenVLConfig, TextConfig
from omnistream.models.interface import KVSpec, MemoryEstimate
from omnistream.models.mrope import media_positions, mrope_positions
from omnistream.models.qwen2_5_vl_vision import VisionTransformer


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(cfg.hidden_size, [q_size, kv_size, kv_size], bias=True)
        self.o_proj = nn.Linear(q_size, cfg.hidden_size, bias=False)
        self.split = [q_size, kv_size, kv_size]
        self.scale = self.head_dim**-0.5
        self.row_backend = None  # paged row kernel, set by the model runner (GPU; CPU tests)

    def forward(self, x, cos, sin, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv_proj(x)
        k_cache, v_cache = kv_cache
        if qkv.is_cuda:  # rotary + cache write in one kernel (layers/triton_rope_kv.py)
            from omnistream.layers.triton_rope_kv import rope_write_kv  # lazy: Triton exists only with CUDA

            q, k, v = rope_write_kv(qkv, cos, sin, k_cache, v_cache, meta.slot_mapping, self.num_heads, self.num_kv_heads, self.head_dim)
        else:
            q, k, v = qkv.split(self.split, dim=-1)
            q, k = rope_qk(q.view(n, self.num_heads, self.head_dim), k.view(n, self.num_kv_heads, self.head_dim), cos, sin)
            v = v.view(n, self.num_kv_heads, self.head_dim)
            write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        out = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale, self.row_backend)
        return self.o_proj(out.reshape(n, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=False)

    def forward(self, x, residual, cos, sin, kv_cache, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """x: this layer's input before its norm, residual: the pending residual (None at
        layer 0). Returns (mlp output, residual), leaving the last add to the next norm."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            residual, h = self.input_layernorm.add_forward(x, residual)
        h = self.self_attn(h, cos, sin, kv_cache, meta)
        residual, h = self.post_attention_layernorm.add_forward(h, residual)
        return self.mlp(h), residual


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = MRotaryEmbedding(cfg.head_dim, cfg.rope_theta, tuple(cfg.mrope_section))

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, kv_caches: list, meta: AttentionMetadata) -> torch.Tensor:
        """embeds: (N, hidden), positions: (3, N) -> hidden states (N, hidden)."""
        cos, sin = self.rotary(positions, embeds.dtype)
        x, residual = embeds, None
        for layer, kv in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, cos, sin, kv, meta)
        return self.norm.add_forward(x, residual)[1]


class Qwen2_5_VLModel(nn.Module):
    """Top level: `model` (decoder), `visual` (vision tower), `lm_head`. Implements
    models/interface.MultimodalLM."""

    packed_modules_mapping = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: QwenVLConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = TextModel(cfg.text)
        self.visual = VisionTransformer(cfg.vision)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if cfg.text.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        t = cfg.text
        self.kv_spec = KVSpec(t.num_hidden_layers, t.num_key_value_heads, t.head_dim)
        self.hidden_size, self.vocab_size = t.hidden_size, t.vocab_size
        self.stop_token_ids = frozenset({cfg.eos_token_id, cfg.im_end_token_id})
        self.max_context = t.max_position_embeddings
        self.tokens_per_second = cfg.vision.tokens_per_second

    # ---------------------------------------------------------------- interface
    def positions(self, num_tokens: int, media, start: int = 0) -> tuple[torch.Tensor, int]:
        """M-RoPE (3, num_tokens) by the original Qwen rule (models/mrope.py)."""
        return mrope_positions(num_tokens, media, self.tokens_per_second, start)

    def media_positions(self, item: MediaItem, start: int) -> torch.Tensor:
        return media_positions(item, start, self.tokens_per_second)

    def media_encoder(self, kind: str) -> nn.Module | None:
        return self.visual if kind in ("image", "video") else None

    def prepare_pixels(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """CLIP normalisation of raw uint8 rows on their device (float rows pass), then cast."""
        return normalize_rows(rows).to(dtype)

    def embed(self, input_ids: torch.Tensor, mm_rows: torch.Tensor | None, mm_embeds: torch.Tensor | None) -> torch.Tensor:
        """input_ids: (N,); mm_rows: (M,) rows of the batch that are media placeholders, filled
        with mm_embeds: (M, hidden) -> (N, hidden)."""
        x = self.model.embed_tokens(input_ids)
        if mm_rows is not None and mm_rows.numel():
            x = x.index_copy(0, mm_rows, mm_embeds.to(x.dtype))
        return x

    def forward(self, embeds, positions, kv_caches, meta) -> torch.Tensor:
        return self.model(embeds, positions, kv_caches, meta)

    def memory_estimate(self, itemsize: int, max_batched_tokens: int, max_encoder_rows: int) -> MemoryEstimate:
        """Weights from the checkpoint's tensor shapes; activations of the larger of a prefill and
        a vision forward (see MultimodalLM.memory_estimate)."""
        from omnistream.models.demo import weight_specs  # the one list of a checkpoint's tensors

        return MemoryEstimate(itemsize * sum(math.prod(shape) for _, shape, _ in weight_specs(self.cfg)),
                              max(prefill_activation_bytes(self.cfg.text, max_batched_tokens, itemsize),
                                  vision_activation_bytes(self.cfg.vision, max_encoder_rows, itemsize)))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def encode_media(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]], kind: str = "video") -> torch.Tensor:
        """Prepared patch rows of several images / videos -> (their tokens, hidden)."""
        return self.visual(pixel_values, grids)

    def encode_media_steps(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]], kind: str = "video") -> Generator[None, None, torch.Tensor]:
        """encode_media one vision block per yield."""
        steps = self.visual.forward_steps(pixel_values, grids)
        del pixel_values  # the tower's generator drops them after its patch embedding
        return (yield from steps)


def prefill_activation_bytes(t: TextConfig, tokens: int, itemsize: int) -> int:
    """Peak activations of a decoder prefill of `tokens` tokens: gate_up output + activation
    product + a few hidden-sized buffers + qkv, per token."""
    return tokens * (3 * t.intermediate_size + 8 * t.hidden_size) * itemsize


def vision_activation_bytes(v, patches: int, itemsize: int) -> int:
    """Peak activations of a vision-tower forward of `patches` patches: the same pattern per
    patch, plus the float32 rotary tables and the merger input."""
    return patches * (3 * v.intermediate_size + 10 * v.hidden_size) * itemsize
