"""Processed media of re-sent parts, by the sha256 of their bytes: a stateless client that sends
the same video every turn pays its decode, preprocessing and hashing once (server/media_parts.py
keys it with the tenant and the part's options).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from omnistream.media.item import MediaItem

MEDIA_CACHE_BYTES = 1 << 30  # preprocessed pixels kept for re-sent media (LRU)


class MediaCache:
    """LRU from (tenant, kind, bytes sha256, options) to the processed MediaItems of one part,
    bounded in bytes of pixel_values. Items are shared read-only (the engine never mutates them)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[tuple, list[MediaItem]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple) -> list[MediaItem] | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: tuple, item: list[MediaItem]) -> None:
        size = _nbytes(item)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = item
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= _nbytes(old)

    def __len__(self) -> int:
        return len(self._items)


def _nbytes(items: list[MediaItem]) -> int:
    return sum(m.pixel_values.numel() * m.pixel_values.element_size() for m in items)
