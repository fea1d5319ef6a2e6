"""Qwen2.5-Omni's audio encoder on our own runtime (parameter names follow the checkpoint's
``audio_tower.*``).

Data flow for a batch of audio items (log-mel rows, frames x 128; item k has grid (chunks, L, 1):
chunks of L frames each, L = 200 (2 s) but for a clip's last piece):
  rows -> one padded batch of chunks (C, 128, Lmax)
    -> conv1 (k3) -> GELU -> zero the padding -> conv2 (k3, stride 2) -> GELU      (C, L2max, d)
    -> + sinusoidal positions, restarting at 0 in every chunk
    -> the valid frames, packed                                                   (N, d)
    -> encoder layers: attention inside each chunk only (one masked SDPA call for all chunks)
    -> average pooling of frame pairs inside each chunk -> LayerNorm -> projection (tokens, out)

Nothing crosses a chunk boundary (the convolutions see the chunk padded with zeros, attention and
pooling stay inside it), so encoding chunk by chunk equals encoding a whole clip: the encoder
cache keeps one entry per 2 s chunk.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from omnistream.layers.segment_attention import SegmentLayout, segment_attention
from omnistream.media.item import audio_chunk_tokens
from omnistream.models.qwen2_5_omni_config import AudioEncoderConfig


def sinusoid_table(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """(length, channels) float32 [sin | cos] table, computed as the reference computes it."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2, dtype=torch.float32))
    scaled = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)


class AudioAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, dim, bias=True)
        self.k_proj = nn.Linear(dim, dim, bias=False)  # the checkpoint's k has no bias
        self.v_proj = nn.Linear(dim, dim, bias=True)
        self.out_proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, layout: SegmentLayout) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = (p(x).view(n, self.num_heads, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = segment_attention(q, k, v, layout, scale=self.head_dim**-0.5)
        return self.out_proj(out.reshape(n, -1))


class AudioEncoderLayer(nn.Module):
    """Pre-norm transformer layer (LayerNorm, attention, LayerNorm, GELU MLP)."""

    def __init__(self, cfg: AudioEncoderConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.self_attn = AudioAttention(d, cfg.encoder_attention_heads)
        self.final_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, d)

    def forward(self, x: torch.Tensor, layout: SegmentLayout) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), layout)
        h = self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        x = x + h
        if x.dtype == torch.float16:  # as the reference: keep float16 activations finite
            limit = torch.finfo(x.dtype).max - 1000
            x = x.clamp(-limit, limit)
        return x


class AudioEncoder(nn.Module):
    def __init__(self, cfg: AudioEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoid_table(cfg.max_source_positions, d), persistent=False)
        # in the checkpoint, unused by the thinker's forward (its audio_bos/eos are text tokens)
        self.audio_bos_eos_token = nn.Embedding(2, cfg.output_dim)
        self.layers = nn.ModuleList([AudioEncoderLayer(cfg) for _ in range(cfg.encoder_layers)])
        self.ln_post = nn.LayerNorm(d)
        self.proj = nn.Linear(d, cfg.output_dim)

    def forward(self, rows: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """rows: (frames, mel bins) of every item, concatenated; grids: (chunks, frames per
        chunk, 1) per item -> (their tokens, output_dim)."""
        lengths = [h * w for t, h, w in grids for _ in range(t)]
        if sum(lengths) != rows.shape[0]:
            raise ValueError(f"audio rows {rows.shape[0]} do not match the grids' {sum(lengths)} frames")
        device, dtype = rows.device, self.conv1.weight.dtype
        lens = torch.tensor(lengths, device=device)
        max_len = max(lengths)
        valid_in = torch.arange(max_len, device=device)[None, :] < lens[:, None]  # (C, Lmax)
        padded = rows.new_zeros(len(lengths), max_len, rows.shape[1], dtype=dtype)
        padded[valid_in] = rows.to(dtype)
        x = F.gelu(self.conv1(padded.transpose(1, 2))) * valid_in[:, None, :].to(dtype)
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (C, L2max, d)
        x = x + self.positional_embedding[: x.shape[1]].to(dtype)
        after_conv = [(n - 1) // 2 + 1 for n in lengths]
        valid = torch.arange(x.shape[1], device=device)[None, :] < torch.tensor(after_conv, device=device)[:, None]
        x = x[valid]  # (N, d): every chunk's frames, in order
        layout = SegmentLayout.from_lengths(after_conv, device)
        for layer in self.layers:
            x = layer(x, layout)
        first = _pair_starts(after_conv, [audio_chunk_tokens(n) for n in lengths], device)
        x = (x[first] + x[first + 1]) / 2  # AvgPool1d(2, 2) inside each chunk
        return self.proj(self.ln_post(x))


def _pair_starts(frames: list[int], tokens: list[int], device: torch.device) -> torch.Tensor:
    """Row of the first frame of every pooled pair: chunk c starts at sum(frames[:c]) and holds
    tokens[c] pairs (a trailing odd frame is dropped)."""
    starts = torch.tensor([0] + frames[:-1], device=device).cumsum(0)
    counts = torch.tensor(tokens, device=device)
    local = torch.arange(int(counts.sum()), device=device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    return torch.repeat_interleave(starts, counts) + 2 * local


def audio_activation_bytes(a, frames: int, itemsize: int) -> int:
    """Peak activations of one audio-encoder forward over `frames` mel frames (AudioEncoder
    above): the float32 input rows and their padded copy, conv1's output with its GELU and mask
    (3 buffers of d per frame), then per frame after the stride-2 conv the layers' pattern (fc1
    output and its GELU, a few d-sized buffers, q/k/v and the padded per-chunk attention batch)."""
    after_conv = frames // 2 + 1
    inputs = 2 * frames * a.num_mel_bins * 4
    conv1 = 3 * frames * a.d_model * itemsize
    layers = after_conv * (2 * a.encoder_ffn_dim + 10 * a.d_model) * itemsize
    return inputs + max(conv1, layers)
