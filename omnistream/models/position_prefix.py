"""Positions of a sequence that extends one whose positions are known (a session's next turn).

M-RoPE and TMRoPE positions of a token depend only on the tokens and media before it, so the
positions of `history + new turn` are the history's positions followed by those of the new
part computed from the history's next position. A session keeps its conversation's positions
and computes only each new turn's (a 60 s clip with sound is 60 media pieces: ~2 ms of host
time per turn to redo from scratch, on the TTFT path).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from omnistream.media.item import MediaItem
from omnistream.models.interface import MultimodalLM

KnownPositions = tuple[torch.Tensor, int]  # (3, n) positions of the first n tokens, next position


def extend_positions(model: MultimodalLM, known: KnownPositions | None, num_tokens: int,
                     media: Sequence[tuple[int, MediaItem]]) -> KnownPositions:
    """(3, num_tokens) positions of a sequence with `media` at absolute (offset, item), and the
    next position, reusing `known` for its first tokens. Raises ValueError when `known` covers
    more than the sequence or ends inside a media block (its positions would depend on what
    follows)."""
    if known is None:
        return model.positions(num_tokens, media)
    prefix, start = known
    n = prefix.shape[1]
    if n > num_tokens:
        raise ValueError(f"known positions cover {n} tokens of a {num_tokens}-token sequence")
    # two tokens either side: Qwen2.5-Omni's audio-in-video block shares positions between its
    # begin / end markers and its pieces
    if any(off - 2 <= n < off + item.num_tokens + 2 for off, item in media):
        raise ValueError("known positions end inside or next to a media placeholder")
    rest = [(off - n, item) for off, item in media if off >= n]
    tail, next_pos = model.positions(num_tokens - n, rest, start)
    return torch.cat([prefix, tail], dim=1), next_pos


def text_positions(known: KnownPositions, count: int) -> KnownPositions:
    """`known` followed by `count` text tokens (generated ones, a template's end of turn): each
    one position further on all three axes."""
    prefix, start = known
    tail = torch.arange(start, start + count).expand(3, -1)
    return torch.cat([prefix, tail], dim=1), start + count
