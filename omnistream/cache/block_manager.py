"""Paged KV block allocation: a fixed pool of blocks, a free list, block tables per request.

The pool is preallocated once (see engine/model_runner.py); this class only hands out block
ids. A request's block table grows as its computed tokens grow; blocks return to the pool when
the request finishes or is preempted.
"""

from __future__ import annotations

from collections import deque

from omnistream.engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def blocks_needed(self, req: Request, num_tokens: int) -> int:
        """Extra blocks `req` needs so that its table covers `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(req.block_table))

    def can_grow(self, req: Request, num_tokens: int) -> bool:
        return self.blocks_needed(req, num_tokens) <= self.num_free

    def grow(self, req: Request, num_tokens: int) -> None:
        n = self.blocks_needed(req, num_tokens)
        assert n <= self.num_free, "grow() without can_grow()"
        req.block_table.extend(self.free_blocks.popleft() for _ in range(n))

    def free(self, req: Request) -> None:
        self.free_blocks.extend(req.block_table)
        req.block_table = []
