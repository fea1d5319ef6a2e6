"""Paged KV block allocation with a multimodal-aware prefix cache.

The pool is preallocated once (engine/model_runner.py); this class hands out block ids. Each
block has a reference count (requests using it + sessions pinning it). Blocks with no
reference sit in `free`, least recently used first; a free block that is full and named (see
cache/prefix_hash.py) stays findable by its name until it is reused for something else
(eviction). A new request first takes the longest run of named blocks matching its prefix.

Two kinds of owners hold references outside requests (both by an owner id, a session's):
- retained KV (`retain`): a session's conversation kept between turns. It is idle: when free
  blocks run short, `evict_retained` drops whole retentions, least recently used first; their
  blocks keep their names until reused, and the session's next request recomputes what is gone.
- owned KV sequences (`owned`): a live session under policy `fast` edits its KV in place, so it
  is not findable by name and cannot be evicted; it is released only by its owner.
Only the engine loop calls this class.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from omnistream.cache.prefix_hash import extend_hashes
from omnistream.engine.request import Request
from omnistream.errors import BudgetError


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # of which found in the cache
    evictions: int = 0  # named blocks reused for other data
    retained_evictions: int = 0  # sessions' idle retained KV dropped for other requests

    def as_dict(self) -> dict:
        return {"queries": self.queries, "hit_tokens": self.hit_tokens, "evictions": self.evictions,
                "retained_evictions": self.retained_evictions,
                "hit_rate": self.hit_tokens / self.queries if self.queries else 0.0}


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.ref = [0] * num_blocks
        self.name: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # name -> block
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.stats = PrefixCacheStats()
        self.retained: OrderedDict[str, list[int]] = OrderedDict()  # owner -> blocks, least recently used first
        self.owned: dict[str, list[int]] = {}  # owner -> block table of its own KV sequence

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # ------------------------------------------------------------------ allocation
    def blocks_needed(self, req: Request, num_tokens: int) -> int:
        """Extra blocks `req` needs so that its table covers `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(req.block_table))

    def can_grow(self, req: Request, num_tokens: int) -> bool:
        return self.blocks_needed(req, num_tokens) <= self.num_free

    def grow(self, req: Request, num_tokens: int) -> None:
        n = self.blocks_needed(req, num_tokens)
        assert n <= self.num_free, "grow() without can_grow()"
        req.block_table.extend(self._take_free() for _ in range(n))

    def _take_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        if self.name[block] is not None:  # evict: the named data is overwritten from now on
            del self.cached[self.name[block]]
            self.name[block] = None
            self.stats.evictions += 1
        self.ref[block] = 1
        return block

    def _acquire(self, block: int) -> None:
        if self.ref[block] == 0:
            del self.free[block]
        self.ref[block] += 1

    def _release(self, block: int) -> None:
        self.ref[block] -= 1
        assert self.ref[block] >= 0, "block released twice"
        if self.ref[block] == 0:
            self.free[block] = None  # most recently used end

    def free_request(self, req: Request) -> None:
        # release the tail first so a sequence's last blocks are evicted before its first ones
        for block in reversed(req.block_table):
            self._release(block)
        req.block_table = []

    # kept for callers that speak of "free"
    free_blocks = property(lambda self: list(self.free))

    def pin(self, blocks: list[int]) -> None:
        """Take one reference on each block (released by unpin())."""
        for b in blocks:
            self._acquire(b)

    def unpin(self, blocks: list[int]) -> None:
        for b in reversed(blocks):
            self._release(b)

    # ------------------------------------------------------------------ retained KV
    def retain(self, owner: str, blocks: list[int]) -> None:
        """`owner` keeps `blocks` (replacing what it kept); most recently used from now."""
        self.pin(blocks)  # the new set before releasing the old one: they overlap
        self.unpin(self.retained.pop(owner, []))
        self.retained[owner] = list(blocks)

    def release_retained(self, owner: str) -> None:
        self.unpin(self.retained.pop(owner, []))

    def touch_retained(self, owner: str) -> None:
        if owner in self.retained:
            self.retained.move_to_end(owner)

    def retained_tokens(self, owner: str) -> int:
        return len(self.retained.get(owner, ())) * self.block_size

    def evict_retained(self, need_free: int, keep: set[int] = frozenset()) -> int:
        """Drops retentions, least recently used first, until `need_free` blocks are free (or
        none is left). Blocks in `keep` (the request being admitted will reuse them) do not
        count as freed. Returns the number of retentions dropped."""
        dropped = 0
        while self.num_free - len(keep & self.free.keys()) < need_free and self.retained:
            owner = next(iter(self.retained))
            self.release_retained(owner)
            dropped += 1
            self.stats.retained_evictions += 1
        return dropped

    # ------------------------------------------------------------------ owned KV sequences
    def owned_blocks(self, owner: str) -> list[int]:
        return self.owned.get(owner, [])

    def grow_owned(self, owner: str, num_tokens: int) -> None:
        """The owner's table covers `num_tokens` tokens (fresh blocks appended)."""
        table = self.owned.setdefault(owner, [])
        need = self.blocks_for(num_tokens) - len(table)
        if need > self.num_free:
            self.evict_retained(need)
        if need > self.num_free:
            raise BudgetError(f"live KV needs {need} more blocks of {self.block_size} tokens, {self.num_free} are free")
        table.extend(self._take_free() for _ in range(max(0, need)))

    def trim_owned(self, owner: str, num_tokens: int) -> None:
        """Releases the owner's blocks beyond the first `num_tokens` tokens."""
        table = self.owned.get(owner, [])
        keep = self.blocks_for(max(num_tokens, 1))
        if len(table) > keep:
            self.unpin(table[keep:])
            del table[keep:]

    def set_owned(self, owner: str, table: list[int]) -> None:
        """The owner's sequence is now `table`, whose references the caller hands over."""
        self.unpin(self.owned.pop(owner, []))
        self.owned[owner] = table

    def release_owned(self, owner: str) -> None:
        self.unpin(self.owned.pop(owner, []))

    # ------------------------------------------------------------------ prefix cache
    def match_prefix(self, req: Request) -> list[int]:
        """Cached blocks holding the longest prefix of `req` (at least one token is left to
        compute, so the request still produces logits)."""
        if not self.enable_caching or req.kv is not None:
            return []
        usable = (req.num_tokens - 1) // self.block_size
        extend_hashes(req.block_hashes, req.token_ids, req.media, self.block_size, usable, req.cache_salt)
        return self.cached_prefix(req.block_hashes[:usable])

    def cached_prefix(self, names: list[bytes]) -> list[int]:
        """Blocks holding the longest run of `names` present in the cache."""
        blocks = []
        for h in names:
            block = self.cached.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def free_after_acquiring(self, blocks: list[int]) -> int:
        return self.num_free - sum(1 for b in blocks if self.ref[b] == 0)

    def take_kv(self, req: Request) -> None:
        """Start `req` on its owner's KV sequence (references its blocks)."""
        blocks = self.owned_blocks(req.kv.owner)
        for b in blocks:
            self._acquire(b)
        req.block_table = list(blocks)
        req.num_computed_tokens = req.kv.computed
        req.metrics.cached_tokens = req.kv.computed

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks, referenced by the caller (a KV sequence outside any request)."""
        assert n <= self.num_free, "allocate() beyond the free blocks"
        return [self._take_free() for _ in range(n)]

    def take_prefix(self, req: Request, blocks: list[int]) -> None:
        if self.enable_caching:  # counted at admission, not at every look while waiting
            self.stats.queries += req.num_tokens
            self.stats.hit_tokens += len(blocks) * self.block_size
        for b in blocks:
            self._acquire(b)
        req.block_table = list(blocks)
        req.num_computed_tokens = len(blocks) * self.block_size
        req.metrics.cached_tokens = req.num_computed_tokens

    def register_computed(self, req: Request) -> None:
        """Names every block of `req` that is full and computed, making it shareable."""
        if not self.enable_caching or req.kv is not None:
            return
        full = req.num_computed_tokens // self.block_size
        extend_hashes(req.block_hashes, req.token_ids, req.media, self.block_size, full, req.cache_salt)
        for i in range(req.num_named_blocks, min(full, len(req.block_hashes))):
            h, block = req.block_hashes[i], req.block_table[i]
            if h not in self.cached and self.name[block] is None:
                self.cached[h] = block
                self.name[block] = h
        req.num_named_blocks = min(full, len(req.block_hashes))
