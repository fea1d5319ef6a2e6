"""Token-budget scheduler (vLLM v1 style): no prefill or decode phase.

Each step hands out at most `max_num_batched_tokens` tokens. Running requests go first (a
decode asks for 1 token, an unfinished prompt for its next chunk), then waiting requests are
admitted while the budget, the sequence limit and free KV blocks allow. When blocks run out
the newest running request is preempted (its blocks freed, recomputed later: still exact).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from omnistream.cache.block_manager import BlockManager
from omnistream.config import SchedulerConfig
from omnistream.engine.request import Request, RequestStatus
from omnistream.errors import BudgetError


@dataclass
class ScheduledChunk:
    request: Request
    start: int  # first token index computed in this step (= num_computed_tokens)
    num_tokens: int  # tokens computed in this step

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the known tokens: a new token is sampled."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]  # in batch order; decodes and prefill chunks mixed
    num_tokens: int  # sum of chunk sizes
    preempted: list[Request]  # requests sent back to waiting in this step


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, blocks: BlockManager) -> None:
        self.cfg = cfg
        self.blocks = blocks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        # a request that cannot fit even alone is refused now, not left to starve
        need = self.blocks.blocks_for(req.prompt_len + req.sampling.max_new_tokens)
        if need > self.blocks.num_blocks:
            raise BudgetError(
                f"request needs {need * self.blocks.block_size} KV tokens "
                f"(prompt {req.prompt_len} + max_new_tokens {req.sampling.max_new_tokens}); "
                f"the KV pool holds {self.blocks.num_blocks * self.blocks.block_size}"
            )
        if not self.cfg.enable_chunked_prefill and req.prompt_len > self.cfg.max_num_batched_tokens:
            raise BudgetError(
                f"prompt of {req.prompt_len} tokens exceeds max_num_batched_tokens "
                f"{self.cfg.max_num_batched_tokens} and chunked prefill is off"
            )
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.cfg.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Request] = []
        for req in list(self.running):
            if budget == 0:
                break
            if req not in self.running:  # preempted by an earlier iteration
                continue
            n = self._chunk_size(req, budget)
            if n == 0:
                continue
            while not self.blocks.can_grow(req, req.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                continue
            self.blocks.grow(req, req.num_computed_tokens + n)
            chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))
            budget -= n
        self._admit(chunks, budget, preempted)
        return SchedulerOutput(chunks, sum(c.num_tokens for c in chunks), preempted)

    def _admit(self, chunks: list[ScheduledChunk], budget: int, preempted: list[Request]) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            req = self.waiting[0]
            if req in preempted:
                break  # do not re-admit in the step that preempted it
            hits = req.kv.blocks if req.kv is not None else self.blocks.match_prefix(req)
            # admit only when the whole prompt fits the free blocks, so admitted work can finish
            need = self.blocks.blocks_for(req.num_tokens) - len(hits)
            if need > self.blocks.free_after_acquiring(hits):
                break
            if req.kv is not None:
                self.blocks.take_kv(req)
            else:
                self.blocks.take_prefix(req, hits)
            n = self._chunk_size(req, budget)
            if n == 0:
                self.blocks.free_request(req)
                req.num_computed_tokens = 0
                break
            self.waiting.popleft()
            self.blocks.grow(req, req.num_computed_tokens + n)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))
            budget -= n

    def _chunk_size(self, req: Request, budget: int) -> int:
        remaining = req.num_tokens - req.num_computed_tokens
        if remaining <= budget:
            return remaining
        return budget if self.cfg.enable_chunked_prefill else 0

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.blocks.free_request(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def finish(self, req: Request) -> None:
        self.running.remove(req)
        if req.kv is not None and req.kv.keep_blocks:  # the owner takes over the references
            req.kept_blocks, req.block_table = req.block_table, []
        else:
            self.blocks.free_request(req)
        req.status = RequestStatus.FINISHED
