"""Names of KV blocks for the prefix cache.

A full block's name is a chained hash of (parent block's name, the block's token ids, and a key
of every media item overlapping the block). Two different videos of the same size have
identical placeholder tokens; the media key keeps their blocks apart. The root of the chain is a
per-tenant salt, so tenants never share blocks.

Media key. An item with per-temporal-patch hashes is keyed patch by patch: for each patch the
block overlaps, (patch hash, its temporal offset, the block's offset into the patch). That is
everything a video token's K/V depends on beyond the chain: its embedding (the patch's pixels,
the tower never looks across patches), its position (s from the chain, t from the temporal
offset, h/w from the offset within the patch). So when a live camera's retained patches change
at patch k, blocks before patch k keep their names and only the rest is recomputed. The
temporal offset is the patch's time minus the item's first (live items: M-RoPE follows real
timestamps) or k * second_per_grid_t. Items without patch hashes use (content hash, offset).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from omnistream.media.item import MediaItem


def root_hash(salt: str | None) -> bytes:
    return hashlib.blake2b(f"omnistream-prefix|{salt or ''}".encode(), digest_size=16).digest()


def block_hash(parent: bytes, tokens: Sequence[int], lo: int, media: Sequence[tuple[int, MediaItem]]) -> bytes | None:
    """Name of the block holding `tokens` (positions lo .. lo + len - 1 of its sequence).
    None when an overlapping media item has no content hash (such blocks are never shared)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    hi = lo + len(tokens)
    for off, item in media:
        if off < hi and off + item.num_tokens > lo:
            key = _media_key(item, off, lo, hi)
            if key is None:
                return None
            h.update(key.encode())
    return h.digest()


def _media_key(item: MediaItem, off: int, lo: int, hi: int) -> str | None:
    """Key of `item` (placeholders from `off`) for the block of tokens [lo, hi)."""
    t = item.grid_thw[0]
    hashes = item.patch_hashes
    if not hashes or len(hashes) != t:
        return None if item.content_hash is None else f"|mm:{item.content_hash}:{lo - off}"
    per = item.tokens_per_temporal_patch
    first, last = max(0, (lo - off) // per), min(t - 1, (hi - 1 - off) // per)
    parts = [f"|mm2:{item.kind}:{item.grid_thw[1]}x{item.grid_thw[2]}:{item.source_start}"]  # source_start places a piece
    for k in range(first, last + 1):
        parts.append(f"|{hashes[k]}:{_temporal_offset(item, k)!r}:{lo - off - k * per}")
    return "".join(parts)


def _temporal_offset(item: MediaItem, k: int) -> float:
    if item.patch_times is not None:
        return item.patch_times[k] - (item.patch_times[0] if item.time_origin is None else item.time_origin)
    return k * item.second_per_grid_t if item.kind == "video" else 0.0


def extend_hashes(hashes: list[bytes], tokens: Sequence[int], media, block_size: int, num_full_blocks: int, salt: str | None) -> None:
    """Appends names until `hashes` covers `num_full_blocks` blocks (stops at an unhashable one)."""
    while len(hashes) < num_full_blocks:
        b = len(hashes)
        parent = hashes[-1] if hashes else root_hash(salt)
        h = block_hash(parent, tokens[b * block_size : (b + 1) * block_size], b * block_size, media)
        if h is None:
            return
        hashes.append(h)
