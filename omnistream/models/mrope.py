"""M-RoPE positions for a Qwen2.5-VL token sequence, following the original rule.

Positions are three rows (t, h, w). Text tokens advance all three rows together. A media block
whose first token would sit at s gets, for temporal index k, row r, column c of the merged grid:
    t = s + floor(k * tokens_per_second * second_per_grid_t)   (images: t = s)
    h = s + r,  w = s + c
and the text after it starts at max(all positions so far) + 1. (transformers 5.x starts it at
s + max(H', W') instead, which differs whenever a video is longer in time than it is wide; we
follow the original code, vLLM and transformers <= 4.57, and pass positions explicitly when
comparing with transformers 5.x.)
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from omnistream.media.item import MediaItem


def media_positions(item: MediaItem, start: int, tokens_per_second: float) -> torch.Tensor:
    """(3, item.num_tokens) positions of one media block whose first token sits at `start`."""
    t, h, w = item.grid_thw
    m = item.merge_size
    lh, lw = h // m, w // m
    if item.kind == "video" and item.patch_times is not None:  # live streams: real timestamps
        t0 = item.patch_times[0]
        t_idx = torch.tensor([math.floor((ts - t0) * tokens_per_second) for ts in item.patch_times], dtype=torch.long)
    elif item.kind == "video":
        step = tokens_per_second * item.second_per_grid_t
        # floor of the product, computed in float64 as the reference's tensor math does
        t_idx = torch.tensor([math.floor(k * step) for k in range(t)], dtype=torch.long)
    else:
        t_idx = torch.zeros(t, dtype=torch.long)
    return grid_positions(t_idx, lh, lw, start)


def grid_positions(t_idx: torch.Tensor, lh: int, lw: int, start: int) -> torch.Tensor:
    """(3, t * lh * lw) positions of a media grid: the time index of each temporal step
    t_idx (t,), the row and the column of each merged patch, all offset by start."""
    t = t_idx.shape[0]
    tt = t_idx.view(t, 1, 1).expand(t, lh, lw)
    hh = torch.arange(lh).view(1, lh, 1).expand(t, lh, lw)
    ww = torch.arange(lw).view(1, 1, lw).expand(t, lh, lw)
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


def mrope_positions(
    num_tokens: int,
    media: Sequence[tuple[int, MediaItem]],
    tokens_per_second: float,
    start: int = 0,
) -> tuple[torch.Tensor, int]:
    """Positions for `num_tokens` tokens whose media blocks are (offset, item) pairs (offsets
    relative to the first token, sorted, non-overlapping).

    `start` is the position of the first token (the next position after an existing prefix).
    Returns (positions (3, num_tokens) long, next position after the last token)."""
    parts: list[torch.Tensor] = []
    cursor, pos = 0, start
    for offset, item in media:
        if offset < cursor:
            raise ValueError("media placeholder ranges overlap or are unsorted")
        if offset > cursor:  # text before the block
            parts.append(torch.arange(pos, pos + offset - cursor).expand(3, -1))
            pos += offset - cursor
        block = media_positions(item, pos, tokens_per_second)
        parts.append(block)
        pos = int(block.max()) + 1
        cursor = offset + item.num_tokens
    if cursor > num_tokens:
        raise ValueError("media placeholder range runs past the sequence")
    if num_tokens > cursor:
        parts.append(torch.arange(pos, pos + num_tokens - cursor).expand(3, -1))
        pos += num_tokens - cursor
    positions = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
    return positions, pos
