"""What the generic engine needs from a model: the interface every registered model implements.

The engine (engine/, cache/, sessions/) calls only these; model-specific rules (M-RoPE or
TMRoPE positions, the media encoders, pixel normalisation, stop ids, the chat template's
end-of-turn) live behind them, so a second model family is a registry entry (models/registry.py),
not a branch in generic code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generator, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from omnistream.layers.attention import AttentionMetadata
from omnistream.media.item import MediaItem


@dataclass(frozen=True)
class KVSpec:
    """Shape of one token's KV: the pool is (layers, 2, blocks, block_size, kv_heads, head_dim)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.finfo(dtype).bits // 8


@dataclass(frozen=True)
class MemoryEstimate:
    """What the memory budget (cache/budget.py) needs from a model, in bytes: its weights as
    loaded, and the peak activations of its largest step (a prefill of the batch budget or one
    media-encoder forward of the encoder budget), before any headroom."""

    weight_bytes: int
    activation_bytes: int


@runtime_checkable
class MultimodalLM(Protocol):
    kv_spec: KVSpec
    hidden_size: int
    vocab_size: int
    stop_token_ids: frozenset[int]  # end of answer (eos, end of turn)
    max_context: int  # tokens one sequence may hold

    def positions(self, num_tokens: int, media: Sequence[tuple[int, MediaItem]], start: int = 0) -> tuple[torch.Tensor, int]:
        """(rows, num_tokens) positions of a sequence whose media sit at (offset, item), and the
        position of the next token."""

    def media_positions(self, item: MediaItem, start: int) -> torch.Tensor:
        """Positions of one media block whose first token sits at `start` (live KV edits)."""

    def embed(self, input_ids: torch.Tensor, mm_rows: torch.Tensor | None, mm_embeds: torch.Tensor | None) -> torch.Tensor:
        """(N,) ids, media rows (M,) filled with (M, hidden) -> (N, hidden)."""

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, kv_caches: list, meta: AttentionMetadata) -> torch.Tensor:
        """(N, hidden) -> (N, hidden) over the paged KV cache."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(S, hidden) -> (S, vocab)."""

    def media_encoder(self, kind: str) -> nn.Module | None:
        """The module that encodes media of `kind` ("image", "video", "audio"), for
        offloading and graph capture; None when the model has none."""

    def prepare_pixels(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Raw (uint8) or normalised patch rows on the device -> the encoder's input dtype."""

    def encode_media(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]], kind: str = "video") -> torch.Tensor:
        """Prepared rows of several items of one encoder (media_encoder(kind), the same for all
        of them) -> (sum of their tokens, hidden)."""

    def encode_media_steps(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]], kind: str = "video") -> Generator[None, None, torch.Tensor]:
        """encode_media as a generator that yields between the encoder's blocks and returns the
        same embeddings (stepwise.py); an encoder that cannot be split runs whole at its first
        next()."""

    def memory_estimate(self, itemsize: int, max_batched_tokens: int, max_encoder_rows: int) -> MemoryEstimate:
        """Weights and peak activations, from the config alone (a CPU budget cannot measure
        host allocations): a prefill of max_batched_tokens tokens, an encoder forward of
        max_encoder_rows rows (patches, mel frames)."""


# Models that hear (Qwen2.5-Omni) also have:
#   audio_config: media/audio.AudioConfig, the log-mel features their audio encoder takes;
#   interleave_media(video, audio_items, block_id) -> the items of one audio-in-video block.
