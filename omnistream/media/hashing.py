"""Media identity, computed once where an item enters the engine (MediaProcessor, right after
patchify), never by the scheduler, per step or per turn.

  patch hash (one per temporal patch of 2 frames; an image has one)
      = blake2b-128( header | rows k*gh*gw : (k+1)*gh*gw of pixel_values' bytes )
      header = format version, grid (h, w), patch / merge / temporal sizes, row length, dtype,
               model_key (the engine's model identity)
  item hash (MediaItem.content_hash)
      = blake2b-128( kind | second_per_grid_t (video) | ordered patch hashes )

A patch hash names exactly the input of one vision-tower slice (the tower never attends across
temporal patches and has no temporal position), so it keys the encoder cache: the same 2 frames
give the same vision embeddings wherever they sit in whichever clip. The temporal index is
deliberately not hashed. The item hash adds what changes the LLM's view of the item (kind, and
the seconds per temporal patch that set its M-RoPE temporal positions) for the prefix cache.

Hashing reads every byte of pixel_values (uint8 rows: a 64-frame 448x448 video is 38 MB); long
items are hashed patch by patch on a small thread pool (hashlib releases the GIL).
`STATS` counts every item hashed, so tests can check that nothing hashes twice.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from omnistream.media.item import MediaItem

DIGEST_SIZE = 16  # bytes of every blake2b digest (32 hex characters)
HASH_VERSION = 1  # bump when the hashed bytes or header change
PARALLEL_MIN_BYTES = 8 << 20  # items at least this large are hashed on the thread pool
MAX_THREADS = 8


@dataclass
class HashStats:
    """Process-wide hashing counters (all MediaProcessors); reset() between measurements."""

    items_hashed: int = 0
    patches_hashed: int = 0
    bytes_hashed: int = 0
    seconds: float = 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes_hashed / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def reset(self) -> None:
        self.items_hashed = self.patches_hashed = self.bytes_hashed = 0
        self.seconds = 0.0

    def snapshot(self) -> dict:
        return {"items_hashed": self.items_hashed, "patches_hashed": self.patches_hashed,
                "bytes_hashed": self.bytes_hashed, "seconds": self.seconds}


STATS = HashStats()
_lock = threading.Lock()  # guards STATS and the pool (MediaProcessor is used from many threads)
_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max(1, min(MAX_THREADS, os.cpu_count() or 1)), thread_name_prefix="media-hash")
        return _pool


def patch_header(grid_hw: tuple[int, int], *, row_len: int, dtype: torch.dtype, patch_size: int,
                 merge_size: int, temporal_patch_size: int, model_key: str) -> bytes:
    """The preprocessing identity hashed in front of every temporal patch's bytes."""
    h, w = grid_hw
    return (f"omnistream-media-v{HASH_VERSION}|grid_hw={h}x{w}|patch={patch_size}|merge={merge_size}"
            f"|temporal={temporal_patch_size}|row={row_len}|dtype={dtype}|model={model_key}|").encode()


def _digest(header: bytes, data: np.ndarray) -> str:
    h = hashlib.blake2b(header, digest_size=DIGEST_SIZE)
    h.update(data)  # a C-contiguous uint8 view: hashlib drops the GIL for it
    return h.hexdigest()


def item_hash(kind: str, patch_hashes: list[str], second_per_grid_t: float = 1.0, patch_times: list[float] | None = None) -> str:
    """Identity of a whole item from its ordered patch hashes (cheap: 32 bytes per patch).
    Timing enters too (it sets the temporal positions, hence the KV): second_per_grid_t, or the
    patches' times relative to the first for live streams."""
    h = hashlib.blake2b(f"omnistream-item-v{HASH_VERSION}|{kind}|".encode(), digest_size=DIGEST_SIZE)
    if kind == "video" and patch_times is not None:
        h.update(("times=" + ",".join(f"{t - patch_times[0]:.6f}" for t in patch_times) + "|").encode())
    elif kind == "video":
        h.update(f"spgt={float(second_per_grid_t)!r}|".encode())
    for p in patch_hashes:
        h.update(bytes.fromhex(p))
    return h.hexdigest()


def compute_patch_hashes(pixel_values: torch.Tensor, grid_thw: tuple[int, int, int], *, patch_size: int = 14,
                         merge_size: int = 2, temporal_patch_size: int = 2, model_key: str = "",
                         parallel: bool | None = None) -> list[str]:
    """One blake2b-128 hex digest per temporal patch of a (gt*gh*gw, row) CPU tensor."""
    t, h, w = grid_thw
    if pixel_values.device.type != "cpu":
        raise ValueError("pixel_values must be on the CPU to be hashed")
    if pixel_values.shape[0] != t * h * w:
        raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows, grid {grid_thw} needs {t * h * w}")
    header = patch_header((h, w), row_len=pixel_values.shape[1], dtype=pixel_values.dtype, patch_size=patch_size,
                          merge_size=merge_size, temporal_patch_size=temporal_patch_size, model_key=model_key)
    flat = pixel_values.detach().contiguous().numpy().reshape(-1).view(np.uint8)
    step = flat.size // t if t else 0
    slices = [flat[k * step : (k + 1) * step] for k in range(t)]
    if parallel is None:
        parallel = t > 1 and flat.size >= PARALLEL_MIN_BYTES and (os.cpu_count() or 1) > 1
    if parallel:
        return list(_executor().map(lambda s: _digest(header, s), slices))
    return [_digest(header, s) for s in slices]


def hash_item(item: MediaItem, *, patch_size: int = 14, temporal_patch_size: int = 2, model_key: str = "") -> MediaItem:
    """Sets item.patch_hashes, item.content_hash and item.hash_s; counts it in STATS.
    Called once per item, by MediaProcessor; everything downstream reads the stored values."""
    t0 = time.perf_counter()
    patches = compute_patch_hashes(item.pixel_values, item.grid_thw, patch_size=patch_size,
                                   merge_size=item.merge_size, temporal_patch_size=temporal_patch_size,
                                   model_key=model_key)
    item.patch_hashes = patches
    item.content_hash = item_hash(item.kind, patches, item.second_per_grid_t)
    item.hash_s = time.perf_counter() - t0
    with _lock:
        STATS.items_hashed += 1
        STATS.patches_hashed += len(patches)
        STATS.bytes_hashed += item.pixel_values.numel() * item.pixel_values.element_size()
        STATS.seconds += item.hash_s
    return item
