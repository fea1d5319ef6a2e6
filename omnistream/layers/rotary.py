"""Rotary embeddings: the LLM's multimodal RoPE (3 position rows: t, h, w) and the vision
tower's 2D RoPE (h, w). Both rotate the whole head dim with the rotate-half convention."""

from __future__ import annotations

import torch
from torch import nn


class MRotaryEmbedding(nn.Module):
    """M-RoPE: head_dim/2 frequencies split into sections [t, h, w] (e.g. 16/24/24), each
    section rotated by the position row of its axis."""

    def __init__(self, head_dim: int, theta: float, mrope_section: tuple[int, ...]) -> None:
        super().__init__()
        assert sum(mrope_section) == head_dim // 2, "mrope_section must sum to head_dim/2"
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # axis of each frequency: section i takes its positions from row i % 3
        axis = torch.cat([torch.full((n,), i % 3) for i, n in enumerate(mrope_section)])
        self.register_buffer("axis", axis, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (3, N) int -> cos, sin: (N, head_dim) in `dtype` (computed in float32)."""
        pos = positions.float()  # (3, N)
        # pick, per frequency, the row of its axis: (N, D/2)
        pos_per_freq = pos[self.axis].T  # (N, D/2)
        freqs = pos_per_freq * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class VisionRotaryEmbedding(nn.Module):
    """2D RoPE for the vision tower: head_dim/4 frequencies for h and the same for w."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        half = head_dim // 2
        inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, hw_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hw_positions: (N, 2) int -> cos, sin: (N, head_dim) float32."""
        freqs = hw_positions.float()[:, :, None] * self.inv_freq  # (N, 2, D/4)
        freqs = freqs.flatten(1)  # (N, D/2): [h freqs, w freqs]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()
