"""Bidirectional attention inside segments of a packed sequence, with no Python loop over
segments. The vision tower needs it twice: window attention (segments = 8x8-patch windows) and
full attention per temporal slice (segments = one frame pair).

Segments are contiguous and in order. They are gathered into a padded batch
(num_segments, max_len), attended with one SDPA call (a key mask hides the padding), and the
valid rows are scattered back. When every segment has the same length the gather is a reshape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from omnistream.layers.attention import _BACKENDS


@dataclass
class SegmentLayout:
    """Precomputed once per vision forward, reused by every block of the same kind."""

    num_segments: int
    max_len: int
    uniform: bool  # all segments have max_len tokens: a plain reshape
    gather_index: torch.Tensor | None  # (num_segments * max_len,) row of each padded slot
    valid_flat: torch.Tensor | None  # (N,) padded slot of each real token, in sequence order
    key_mask: torch.Tensor | None  # (num_segments, 1, 1, max_len) bool, True = attend

    @staticmethod
    def from_lengths(lengths: list[int], device: torch.device) -> "SegmentLayout":
        n, max_len = len(lengths), max(lengths)
        if all(l == max_len for l in lengths):
            return SegmentLayout(n, max_len, True, None, None, None)
        lens = torch.tensor(lengths, device=device)
        starts = torch.cumsum(lens, 0) - lens
        slot = torch.arange(max_len, device=device)
        valid = slot[None, :] < lens[:, None]  # (S, L)
        # padded slots point at the segment's first row (any valid row works: they are masked)
        gather = torch.where(valid, starts[:, None] + slot[None, :], starts[:, None])
        valid_flat = valid.flatten().nonzero().squeeze(1)
        return SegmentLayout(n, max_len, False, gather.flatten(), valid_flat, valid[:, None, None, :])


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout, scale: float) -> torch.Tensor:
    """q, k, v: (N, H, D) packed -> (N, H, D)."""
    n, h, d = q.shape
    s, l = layout.num_segments, layout.max_len

    def to_batch(x: torch.Tensor) -> torch.Tensor:
        if not layout.uniform:
            x = x[layout.gather_index]
        return x.view(s, l, h, d).transpose(1, 2)  # (S, H, L, D)

    with sdpa_kernel(_BACKENDS):  # no cuDNN: a plan per new shape (see layers/attention.py)
        out = F.scaled_dot_product_attention(
            to_batch(q), to_batch(k), to_batch(v), attn_mask=layout.key_mask, scale=scale
        )  # (S, H, L, D)
    out = out.transpose(1, 2).reshape(s * l, h, d)
    if not layout.uniform:
        out = out[layout.valid_flat]
    return out
