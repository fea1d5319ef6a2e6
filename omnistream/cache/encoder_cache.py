"""Encoder cache: vision embeddings per temporal patch, keyed by the patch's content hash.

One entry = the (tokens_per_temporal_patch, hidden) output of the vision tower for one temporal
patch (2 frames, or one image), named by `MediaItem.patch_hashes[k]` (media/hashing.py). The
tower never attends across temporal patches and has no temporal position, so an entry is valid
for that patch wherever it appears: a clip whose first k patches are cached encodes only the rest.

Policy:
  - GPU tier under `capacity_bytes`; LRU over the entries no running request references
    (acquire / release count references; a referenced entry is never evicted).
  - optional CPU tier under `cpu_capacity_bytes`: entries evicted from the GPU tier (or that
    do not fit there) move to the CPU and are promoted back on a hit.
  - an entry larger than a tier is not cached in it; when room cannot be made without evicting
    a referenced entry, nothing is inserted. Correctness never depends on the cache.

`VisionPlan` turns a list of media items into the sub-items still to encode (runs of
consecutive missing temporal patches) and reassembles per-item (or per-patch) embeddings
afterwards; the model runner calls it around its vision forward, on the temporal slices
(`temporal_slice`) of the items that the step's chunks cover. Not thread-safe: the engine loop owns it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from omnistream.media.item import MediaItem


@dataclass
class EncoderCacheStats:
    hits: int = 0  # lookups served (either tier)
    misses: int = 0  # lookups not served
    evictions: int = 0  # entries pushed out of the GPU tier (to the CPU tier or dropped)
    bytes: int = 0  # bytes held in the GPU tier
    entries: int = 0  # entries in the GPU tier
    cpu_hits: int = 0  # hits served from the CPU tier (promoted back)
    cpu_bytes: int = 0  # bytes held in the CPU tier
    cpu_entries: int = 0  # entries in the CPU tier
    cpu_evictions: int = 0  # entries dropped from the CPU tier
    inserts: int = 0  # entries stored (either tier)
    rejected: int = 0  # inserts refused: too large, or no room without evicting referenced entries

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    def as_dict(self) -> dict:
        return asdict(self) | {"hit_rate": self.hit_rate}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class EncoderCache:
    def __init__(self, capacity_bytes: int, cpu_capacity_bytes: int = 0) -> None:
        if capacity_bytes < 0 or cpu_capacity_bytes < 0:
            raise ValueError("encoder cache capacities must be >= 0")
        self.capacity_bytes = int(capacity_bytes)
        self.cpu_capacity_bytes = int(cpu_capacity_bytes)
        self.stats = EncoderCacheStats()
        self._gpu: dict[str, torch.Tensor] = {}  # entries on the engine device
        self._lru: OrderedDict[str, None] = OrderedDict()  # unreferenced GPU keys, oldest first
        self._evictable = 0  # bytes of the keys in _lru
        self._cpu: OrderedDict[str, tuple[torch.Tensor, torch.device]] = OrderedDict()  # oldest first
        self._refs: dict[str, int] = {}

    # ------------------------------------------------------------ queries
    def __contains__(self, key: str) -> bool:
        return key in self._gpu or key in self._cpu

    def __len__(self) -> int:
        return len(self._gpu) + len(self._cpu)

    def refcount(self, key: str) -> int:
        return self._refs.get(key, 0)

    def tier(self, key: str) -> str | None:
        """"gpu", "cpu" or None (for tests and introspection)."""
        return "gpu" if key in self._gpu else "cpu" if key in self._cpu else None

    # ------------------------------------------------------------ references
    def acquire(self, keys: Iterable[str]) -> None:
        """A running request uses these keys (cached or about to be): never evict them."""
        for k in keys:
            n = self._refs.get(k, 0)
            self._refs[k] = n + 1
            if n == 0 and k in self._lru:
                del self._lru[k]
                self._evictable -= _nbytes(self._gpu[k])

    def release(self, keys: Iterable[str]) -> None:
        for k in keys:
            n = self._refs.get(k, 0)
            if n <= 0:
                raise ValueError(f"release of an unreferenced encoder cache key {k}")
            if n > 1:
                self._refs[k] = n - 1
                continue
            del self._refs[k]
            if k in self._gpu:
                self._lru[k] = None  # most recently used
                self._evictable += _nbytes(self._gpu[k])

    # ------------------------------------------------------------ lookup / insert
    def get(self, key: str) -> torch.Tensor | None:
        """The cached embeddings (on the device they were inserted from), or None. Counts a hit
        or a miss; a CPU-tier hit is promoted to the GPU tier when room can be made."""
        t = self._gpu.get(key)
        if t is not None:
            if key in self._lru:
                self._lru.move_to_end(key)
            self.stats.hits += 1
            return t
        if key in self._cpu:
            host, device = self._cpu.pop(key)
            self._account_cpu(host, -1)
            t = host.to(device)
            self.stats.hits += 1
            self.stats.cpu_hits += 1
            if not self._insert_gpu(key, t):
                self._cpu[key] = (host, device)  # stays on the CPU (most recently used)
                self._account_cpu(host, +1)
            return t
        self.stats.misses += 1
        return None

    def put(self, key: str, value: torch.Tensor) -> bool:
        """Stores `value` (owned by the cache from now on: pass a tensor nothing else writes, and
        that does not view a larger one). Returns whether it was cached in either tier."""
        if key in self._gpu:
            if key in self._lru:
                self._lru.move_to_end(key)
            return True
        if key in self._cpu:
            host, _ = self._cpu.pop(key)
            self._account_cpu(host, -1)
        if self._insert_gpu(key, value) or self._insert_cpu(key, value):
            self.stats.inserts += 1
            return True
        self.stats.rejected += 1
        return False

    def discard(self, key: str) -> None:
        """Drops the key from both tiers (references are kept)."""
        if key in self._gpu:
            t = self._gpu.pop(key)
            if key in self._lru:
                del self._lru[key]
                self._evictable -= _nbytes(t)
            self._account_gpu(t, -1)
        if key in self._cpu:
            host, _ = self._cpu.pop(key)
            self._account_cpu(host, -1)

    def clear(self) -> None:
        """Drops every entry (references and statistics counters are kept)."""
        for k in list(self._gpu) + list(self._cpu):
            self.discard(k)

    # ------------------------------------------------------------ internals
    def _account_gpu(self, t: torch.Tensor, sign: int) -> None:
        self.stats.bytes += sign * _nbytes(t)
        self.stats.entries += sign

    def _account_cpu(self, t: torch.Tensor, sign: int) -> None:
        self.stats.cpu_bytes += sign * _nbytes(t)
        self.stats.cpu_entries += sign

    def _insert_gpu(self, key: str, value: torch.Tensor) -> bool:
        n = _nbytes(value)
        if n > self.capacity_bytes or self.stats.bytes - self._evictable + n > self.capacity_bytes:
            return False  # too large, or only referenced entries stand in the way
        while self.stats.bytes + n > self.capacity_bytes:
            victim, _ = self._lru.popitem(last=False)
            t = self._gpu.pop(victim)
            self._evictable -= _nbytes(t)
            self._account_gpu(t, -1)
            self.stats.evictions += 1
            self._insert_cpu(victim, t)
        self._gpu[key] = value
        self._account_gpu(value, +1)
        if key not in self._refs:
            self._lru[key] = None
            self._evictable += n
        return True

    def _insert_cpu(self, key: str, value: torch.Tensor) -> bool:
        n = _nbytes(value)
        if n > self.cpu_capacity_bytes:
            return False
        need = self.stats.cpu_bytes + n - self.cpu_capacity_bytes
        victims = []
        if need > 0:  # oldest unreferenced first; give up (evicting nothing) if that is not enough
            for k, (host, _) in self._cpu.items():
                if k in self._refs:
                    continue
                victims.append(k)
                need -= _nbytes(host)
                if need <= 0:
                    break
            if need > 0:
                return False
        for k in victims:
            host, _ = self._cpu.pop(k)
            self._account_cpu(host, -1)
            self.stats.cpu_evictions += 1
        host = value if value.device.type == "cpu" else value.to("cpu")
        self._cpu[key] = (host, value.device)
        self._account_cpu(host, +1)
        return True


class VisionPlan:
    """What a vision forward must encode given the cache, and how to reassemble its output.

        plan = VisionPlan(cache, items)        # looks every temporal patch up (once)
        outs = encode(plan.to_encode)          # one embedding tensor per sub-item
        embeds = plan.finish(outs)             # inserts new patches; per-item embeddings

    A sub-item is a run of consecutive temporal patches of one item missing from the cache (and
    not already being encoded for an earlier item of the same call): grid (k, h, w), its rows
    sliced from the item's pixel_values. Items without patch hashes are encoded whole, uncached.
    """

    def __init__(self, cache: EncoderCache, items: list[MediaItem]) -> None:
        self.cache = cache
        self.to_encode: list[MediaItem] = []
        self.encoded_tokens: list[int] = []  # per item: tokens this call encodes for it
        self._sub_keys: list[list[str] | None] = []  # patch keys of each sub-item (None: uncached)
        self._sub_tpp: list[int] = []  # tokens per temporal patch of each sub-item
        self._parts: list[list] = []  # per item, in order: cached tensors or (sub-item, first patch, count)
        pending: dict[str, tuple[int, int]] = {}  # key -> (sub-item, patch in it) encoded by this call
        for item in items:
            t = item.grid_thw[0]
            keys = item.patch_hashes
            if not keys or len(keys) != t:
                self._parts.append([(self._add_sub(item, 0, t, None), 0, t)])
                self.encoded_tokens.append(item.num_tokens)
                continue
            parts: list = []
            run: list[str] = []  # consecutive missing patches, ending before patch k
            encoded = 0

            def flush(k: int) -> None:
                nonlocal encoded
                if run:
                    sub = self._add_sub(item, k - len(run), k, run)
                    pending.update({key: (sub, i) for i, key in enumerate(run)})
                    parts.append((sub, 0, len(run)))
                    encoded += len(run) * item.tokens_per_temporal_patch
                    run.clear()

            for k, key in enumerate(keys):
                if key in run:  # the same 2 frames twice within a run: encode them once
                    flush(k)
                src = pending.get(key)
                if src is not None:
                    flush(k)
                    parts.append((src[0], src[1], 1))
                    continue
                cached = self.cache.get(key)
                if cached is not None:
                    flush(k)
                    parts.append(cached)
                else:
                    run.append(key)
            flush(t)
            self._parts.append(parts)
            self.encoded_tokens.append(encoded)

    def _add_sub(self, item: MediaItem, k0: int, k1: int, keys: list[str] | None) -> int:
        self.to_encode.append(temporal_slice(item, k0, k1, with_hashes=False))
        self._sub_keys.append(list(keys) if keys is not None else None)
        self._sub_tpp.append(item.tokens_per_temporal_patch)
        return len(self.to_encode) - 1

    def finish(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """outputs: one (sub.num_tokens, hidden) tensor per sub-item, in order -> per-item
        embeddings (item.num_tokens, hidden); new patch embeddings are inserted in the cache."""
        return [p[0] if len(p) == 1 else torch.cat(p) for p in self.finish_patches(outputs)]

    def finish_patches(self, outputs: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """As `finish`, per item a list of its temporal patches' (tokens_per_temporal_patch,
        hidden) embeddings: cache entries, or views of `outputs` for uncached sub-items."""
        assert len(outputs) == len(self.to_encode)
        subs = []  # per sub-item, its patches; a new cache entry is shared with the request
        for out, keys, tpp in zip(outputs, self._sub_keys, self._sub_tpp):
            patches = list(out.split(tpp))
            if keys is not None:
                patches = [p.clone() for p in patches]  # the cache owns entries that view nothing larger
                for key, p in zip(keys, patches):
                    self.cache.put(key, p)
            subs.append(patches)
        result = []
        for parts in self._parts:
            patches: list[torch.Tensor] = []
            for p in parts:
                if isinstance(p, torch.Tensor):
                    patches.append(p)
                else:
                    sub, first, count = p
                    patches += subs[sub][first : first + count]
            result.append(patches)
        return result


def temporal_slice(item: MediaItem, k0: int, k1: int, with_hashes: bool = True) -> MediaItem:
    """Temporal patches [k0, k1) of an item as an item of its own: grid (k1 - k0, h, w), its
    pixel rows (a view) and, with_hashes, its patch hashes. The whole item is returned as is."""
    t, h, w = item.grid_thw
    if (k0, k1) == (0, t):
        return item
    hw = h * w
    keys = item.patch_hashes[k0:k1] if with_hashes and item.patch_hashes and len(item.patch_hashes) == t else None
    return MediaItem(kind=item.kind, pixel_values=item.pixel_values[k0 * hw : k1 * hw],
                     grid_thw=(k1 - k0, h, w), merge_size=item.merge_size, patch_hashes=keys)
