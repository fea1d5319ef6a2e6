"""Names of KV blocks for the prefix cache.

A full block's name is a chained hash of (parent block's name, the block's token ids, and
(content hash, offset into the item) of every media item overlapping the block). Two different
videos of the same size have identical placeholder tokens; the media key keeps their blocks
apart. The root of the chain is a per-tenant salt, so tenants never share blocks.
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
            if item.content_hash is None:
                return None
            h.update(f"|mm:{item.content_hash}:{lo - off}".encode())
    return h.digest()


def extend_hashes(hashes: list[bytes], tokens: Sequence[int], media, block_size: int, num_full_blocks: int, salt: str | None) -> None:
    """Appends names until `hashes` covers `num_full_blocks` blocks (stops at an unhashable one)."""
    while len(hashes) < num_full_blocks:
        b = len(hashes)
        parent = hashes[-1] if hashes else root_hash(salt)
        h = block_hash(parent, tokens[b * block_size : (b + 1) * block_size], b * block_size, media)
        if h is None:
            return
        hashes.append(h)
