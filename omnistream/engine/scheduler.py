"""Token-budget scheduler (vLLM v1 style): no prefill or decode phase.

Each step hands out at most `max_num_batched_tokens` tokens. Running requests go first (a
decode asks for 1 token, an unfinished prompt for its next chunk), then waiting requests are
admitted while the budget, the sequence limit and free KV blocks allow. When blocks run out
the newest running request is preempted (its blocks freed, recomputed later: still exact).

While any sequence decodes, prefill is capped so that one long prompt cannot stall the running
answers: at most `max_step_tokens_while_decoding` tokens per step (decodes included), once per
request in prefill by default (`prefill_cap_scope`), pooled and served in order, up to
`max_prefill_tokens_while_decoding` (the largest CUDA graph) in all: a burst of short questions
joins the running batch in a step or two (one cap per step took ten steps of a 64-question
burst on the H200); a single 8k-token clip alone still runs one cap per step (with others in
prefill behind it, it takes from the pool first: it came first).

Admission (the policy for requests that fit the pool but not the free blocks now):
- a request is admitted only when its whole prompt fits the free blocks, after dropping idle
  retained session KV (least recently used first) if that is what it takes;
- a waiting request that does not fit may be bypassed by later, smaller ones (FCFS with
  bounded bypass), but only `max_bypass` times: after that nothing behind it is admitted until
  it fits, which happens as running requests finish (it is known to fit an empty pool);
- a request that does not fit although nothing runs and nothing is retained (the pool is held
  by live sessions' owned KV) fails with a BudgetError instead of waiting forever.
Requests that can never fit are refused before they reach the scheduler (engine/llm_engine.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from omnistream.cache.block_manager import BlockManager
from omnistream.config import SchedulerConfig
from omnistream.engine.graph_limits import FULL
from omnistream.engine.request import Request, RequestStatus
from omnistream.errors import BudgetError


@dataclass
class ScheduledChunk:
    request: Request
    start: int  # first token index computed in this step (= num_computed_tokens)
    num_tokens: int  # tokens computed in this step
    # a decode whose input token is still on the device (sampled by the step in flight before
    # this one: llm_engine's overlapped decode); it always samples
    pending: bool = False

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the known tokens: a new token is sampled."""
        return self.pending or self.start + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]  # in batch order; decodes and prefill chunks mixed
    num_tokens: int  # sum of chunk sizes
    preempted: list[Request]  # requests sent back to waiting in this step
    rejected: list[tuple[Request, Exception]] = field(default_factory=list)  # failed at admission


MIN_PREFILL_TOKENS = 16  # prefill progress per step however many sequences decode


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, blocks: BlockManager, graph_rows: int = FULL.rows) -> None:
        """graph_rows: the largest CUDA graph's rows, the prefill pool's ceiling while decoding
        where cfg.max_prefill_tokens_while_decoding is unset (engine/graph_limits.py)."""
        self.cfg = cfg
        self.blocks = blocks
        self.step_ceiling = max(cfg.max_step_tokens_while_decoding, cfg.max_prefill_tokens_while_decoding or graph_rows)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._prefill_left = cfg.max_num_batched_tokens  # prefill tokens left in the step being built
        self._chunk_cap: int | None = None  # most prefill tokens one request takes in this step (each_request)
        self._decoding = False  # some sequence decodes in the step being built (its prefill is capped)

    MAX_BYPASS = 32  # later requests admitted ahead of a waiting one before it blocks the queue

    def check(self, req: Request) -> None:
        """Raises BudgetError for a request that can never run (called before add())."""
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

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def remove(self, req: Request) -> bool:
        """Takes `req` out (abort or failure), freeing its blocks; False if it is not here."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        else:
            return False
        self.blocks.free_request(req)
        req.status = RequestStatus.FINISHED
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.cfg.max_num_batched_tokens
        # prefill tokens of this step: capped while someone decodes (see SchedulerConfig)
        decoding = self.num_decoding()
        self._decoding = bool(decoding) and self.cfg.enable_chunked_prefill
        if self._decoding:
            cap = self.cfg.max_step_tokens_while_decoding * self._prefill_shares(len(self.running) - decoding)
            cap = min(cap, self.step_ceiling)
            self._prefill_left = min(budget, max(MIN_PREFILL_TOKENS, cap - decoding))
            # each_request: no request's chunk takes more than one cap of the pool
            self._chunk_cap = self.cfg.max_step_tokens_while_decoding if self.cfg.prefill_cap_scope == "each_request" else None
        else:
            self._prefill_left, self._chunk_cap = budget, None
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
            self._charge(req, n)
        rejected = self._admit(chunks, budget, preempted)
        return SchedulerOutput(chunks, sum(c.num_tokens for c in chunks), preempted, rejected)

    def num_decoding(self) -> int:
        """Running requests past their prompt: each decodes one token per step."""
        return sum(1 for r in self.running if r.num_computed_tokens >= r.prompt_len)

    def _prefill_shares(self, prefilling: int) -> int:
        """How many max_step_tokens_while_decoding caps this step's prefill gets (>= 1):
        per_request, one per request in prefill (running mid-prompt, or waiting with a free
        sequence slot); per_step, one."""
        if self.cfg.prefill_cap_scope == "per_step":
            return 1  # (each_request pools like per_request, and limits each chunk to one cap)
        room = max(0, self.cfg.max_num_seqs - len(self.running))
        return max(1, prefilling + min(len(self.waiting), room))

    def _admit(self, chunks: list[ScheduledChunk], budget: int, preempted: list[Request]) -> list[tuple[Request, Exception]]:
        rejected: list[tuple[Request, Exception]] = []
        blocked: list[Request] = []  # waiting requests this step could not admit, in order
        closed = False  # a blocked request has been passed MAX_BYPASS times: nothing passes it
        for req in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.cfg.max_num_seqs:
                break
            if req in preempted:
                break  # do not re-admit in the step that preempted it
            if closed:
                break  # an older request has waited long enough: nothing passes it any more
            hits = self._fit(req)
            if hits is None:
                if not self.running and not self.blocks.retained:
                    rejected.append((req, self._held_by_owned(req)))
                    self.waiting.remove(req)
                    continue
                blocked.append(req)
                closed = req.num_bypassed >= self.MAX_BYPASS
                continue
            start = req.kv.computed if req.kv is not None else len(hits) * self.blocks.block_size
            if req.media_ready_until is not None and req.media_ready_until <= start:
                continue  # its next tokens are media still being encoded: later requests may run
            if req.kv is not None:
                self.blocks.take_kv(req)
            else:
                self.blocks.take_prefix(req, hits)
            n = self._chunk_size(req, budget)
            if n == 0:
                self.blocks.free_request(req)
                req.num_computed_tokens = 0
                break
            self.waiting.remove(req)
            self.blocks.grow(req, req.num_computed_tokens + n)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))
            budget -= n
            self._charge(req, n)
            for b in blocked:
                b.num_bypassed += 1
                closed = closed or b.num_bypassed >= self.MAX_BYPASS
        return rejected

    def _fit(self, req: Request) -> list[int] | None:
        """The cached blocks `req` starts from when its whole prompt fits the free blocks now
        (dropping idle retained KV if needed), else None."""
        hits = self.blocks.owned_blocks(req.kv.owner) if req.kv is not None else self.blocks.match_prefix(req)
        need = self.blocks.blocks_for(req.num_tokens) - len(hits)
        if need <= self.blocks.free_after_acquiring(hits):
            return hits
        if not self.blocks.retained:
            return None
        # hits may sit in a retention about to be dropped: they stay named, so look again
        self.blocks.evict_retained(need + len(hits), keep=set(hits))
        if req.kv is None:
            hits = self.blocks.match_prefix(req)
        need = self.blocks.blocks_for(req.num_tokens) - len(hits)
        return hits if need <= self.blocks.free_after_acquiring(hits) else None

    def _held_by_owned(self, req: Request) -> BudgetError:
        held = sum(len(t) for t in self.blocks.owned.values()) * self.blocks.block_size
        return BudgetError(
            f"request needs {self.blocks.blocks_for(req.num_tokens) * self.blocks.block_size} KV tokens but only "
            f"{self.blocks.num_free * self.blocks.block_size} are free: {held} are held by live sessions' own KV"
        )

    def _chunk_size(self, req: Request, budget: int) -> int:
        remaining = req.num_tokens - req.num_computed_tokens
        if req.num_computed_tokens < req.prompt_len:  # a prompt chunk: the prefill cap applies
            budget = min(budget, self._prefill_left, self._chunk_cap or budget, self._context_cap(req))
            if req.media_ready_until is not None:  # media still being encoded (encode_ahead.py)
                budget = min(budget, max(0, req.media_ready_until - req.num_computed_tokens))
        if remaining <= budget:
            return remaining
        return budget if self.cfg.enable_chunked_prefill and budget > 0 else 0

    def _context_cap(self, req: Request) -> int:
        """prefill_context_tokens_while_decoding: a chunk past that much context gets the cap in
        proportion (at least MIN_PREFILL_TOKENS); no limit otherwise."""
        ref, ctx = self.cfg.prefill_context_tokens_while_decoding, req.num_computed_tokens
        if not self._decoding or ref is None or ctx <= ref:
            return self.cfg.max_num_batched_tokens
        return max(MIN_PREFILL_TOKENS, self.cfg.max_step_tokens_while_decoding * ref // ctx)

    def _charge(self, req: Request, n: int) -> None:
        if req.num_computed_tokens < req.prompt_len:
            self._prefill_left -= n

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.blocks.free_request(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        self.waiting.appendleft(req)

    def finish(self, req: Request) -> None:
        self.running.remove(req)
        if req.kv is not None and req.kv.keep:  # the owner takes over the references
            self.blocks.set_owned(req.kv.owner, req.block_table)
            req.block_table = []
        else:
            self.blocks.free_request(req)
        req.status = RequestStatus.FINISHED
