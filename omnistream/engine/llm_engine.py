"""The engine's state machine: requests -> schedule a step -> run it -> results.

Owns the scheduler, the block manager and the model runner. Only the engine loop
(engine/core.py) calls `add`, `step`, `abort` and the KV operations; `make_request` is pure
(positions, prefix-cache names, budget checks) and runs in the submitting thread. Knows nothing
about chat templates or media files, and nothing of a concrete model: the model interface
(models/interface.py) gives positions, stop ids and the context limit.
"""

from __future__ import annotations

import itertools
import logging
import resource
import time
import uuid
from dataclasses import dataclass, field

import torch

from omnistream.cache.block_manager import BlockManager
from omnistream.cache.prefix_hash import extend_hashes
from omnistream.config import EngineConfig
from omnistream.engine.graph_limits import graph_limits
from omnistream.engine.model_runner import LaunchedStep, ModelRunner
from omnistream.engine.protocol import EngineRequest
from omnistream.engine.request import Request, RequestStatus
from omnistream.engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from omnistream.errors import BudgetError, EngineError, UserInputError
from omnistream.models.interface import MultimodalLM
from omnistream.models.position_prefix import extend_positions

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    sampled: list[tuple[Request, int]] = field(default_factory=list)  # (request, new token) in batch order
    finished: list[Request] = field(default_factory=list)  # ended normally (stop / length)
    failed: list[Request] = field(default_factory=list)  # ended with req.error set
    num_rows: int = 0  # tokens computed in the step
    num_seqs: int = 0  # sequences in the step


@dataclass
class _InFlight:
    out: SchedulerOutput
    launched: LaunchedStep
    t0: float  # when its launch began


@dataclass
class EngineCounters:
    steps: int = 0
    rows: int = 0  # tokens computed, all steps
    seqs: int = 0  # sequences, summed over steps
    decode_steps: int = 0  # steps that sampled for more than one sequence: shared forwards
    max_seqs: int = 0  # most sequences in one step
    failed_steps: int = 0  # steps whose batch raised (then re-run one request at a time)
    overlapped_steps: int = 0  # decode steps launched before the step before them was read

    def as_dict(self) -> dict:
        return {**self.__dict__, "mean_seqs_per_step": self.seqs / self.steps if self.steps else 0.0}


class LLMEngine:
    def __init__(self, model: MultimodalLM, cfg: EngineConfig, num_blocks: int) -> None:
        self.cfg = cfg
        self.model = model
        self.device = torch.device(cfg.device)
        self.stop_ids = set(model.stop_token_ids)
        self.max_context = model.max_context
        self.blocks = BlockManager(num_blocks, cfg.cache.block_size, cfg.cache.enable_prefix_caching)
        self.scheduler = Scheduler(cfg.scheduler, self.blocks, graph_limits(cfg.cache.memory_budget_bytes).rows)
        self.runner = ModelRunner(model, num_blocks, cfg.cache.block_size, self.device, cfg.torch_dtype)
        self.requests: dict[str, Request] = {}  # every request not yet ended, by id
        self.counters = EngineCounters()
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:6]
        self.overlap = cfg.overlap_decode  # see step(); needs the row-batch path (runner.graphs)
        self._inflight: _InFlight | None = None  # a decode step launched, its tokens not yet read
        # media encoded ahead of their steps (engine/encode_ahead.py), two steps' worth at most
        self.ahead = None
        if cfg.encode_ahead or cfg.vision_slices:
            self.ahead = self.runner.enable_encode_ahead(2 * cfg.scheduler.max_num_batched_tokens, cfg.vision_slices)

    # ------------------------------------------------------------------ submitting thread
    def make_request(self, spec: EngineRequest) -> Request:
        """A Request ready for `add` (any thread; touches no engine state). Raises
        BudgetError for a request that can never run, UserInputError for a malformed one."""
        if not spec.token_ids:
            raise UserInputError("empty prompt")
        if spec.kv is not None:
            positions, next_pos = spec.kv.positions, spec.kv.next_pos
        else:
            try:
                positions, next_pos = extend_positions(self.model, spec.known_positions, len(spec.token_ids), spec.media)
            except ValueError as e:
                raise UserInputError(f"malformed media placeholders: {e}") from None
        total = len(spec.token_ids) + spec.sampling.max_new_tokens
        if total > self.max_context:
            raise BudgetError(f"prompt {len(spec.token_ids)} + max_new_tokens {spec.sampling.max_new_tokens} "
                              f"exceeds the model's context of {self.max_context} tokens")
        rid = spec.request_id or f"req-{self._prefix}-{next(self._ids)}"
        req = Request(rid, spec, positions, next_pos, self.stop_ids)
        self.scheduler.check(req)
        if spec.kv is None:  # name the prompt's full blocks now, off the loop
            bs = self.blocks.block_size
            full = req.prompt_len // bs
            req.block_hashes = list(spec.known_hashes[:full]) if spec.known_hashes else []
            extend_hashes(req.block_hashes, req.token_ids, req.media, bs, full, req.cache_salt)
        return req

    # ------------------------------------------------------------------ loop only
    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise UserInputError(f"request id {req.request_id!r} is already running")
        self.requests[req.request_id] = req
        self.scheduler.add(req)

    def enter_loop_thread(self) -> None:
        """Called once by the engine loop's thread before its first step."""
        self.runner.enter_loop_thread()

    def has_work(self) -> bool:
        return self._inflight is not None or self.scheduler.has_work()

    def abort(self, request_id: str) -> Request | None:
        """Ends a waiting or running request now (finish_reason "abort"), freeing its blocks."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.scheduler.remove(req)
        req.finish_reason = "abort"
        self._ended(req)
        return req

    def step(self) -> StepResult:
        """One scheduling step. A failing batch is re-run one request at a time, so an error
        fails the request that causes it and no other.

        Overlapped decode: a greedy decode batch is left in flight; the next call launches the
        batch after it (every request one token further, its input token taken on the device)
        before waiting for its tokens, so the host's bookkeeping of one step runs while the GPU
        computes the next. Lossless: the same rows with the same inputs, one step earlier."""
        if self._inflight is not None:
            prev, self._inflight = self._inflight, None
            self._inflight = self._chain(prev)
            return self._complete(prev)
        self._encode_ahead()
        out = self.scheduler.schedule()
        result = StepResult()
        for req, err in out.rejected:
            self._fail(req, err, result)
        if not out.chunks:
            if self.ahead is not None and self.ahead.inflight:
                self.ahead.wait()  # nothing runs until media encoded ahead are ready
            return result
        self._advance_sliced(out)
        t0 = time.perf_counter()
        try:
            launched = self.runner.launch(out)
        except Exception as e:  # noqa: BLE001 - isolated below, the loop must survive
            self.counters.failed_steps += 1
            log.warning("step of %d requests failed (%s); re-running them one at a time", len(out.chunks), e)
            done = self._isolate(out, result)
            launched = LaunchedStep(chunks=[c for c, _ in done], tokens=[t for _, t in done])
        step = _InFlight(out, launched, t0)
        if launched.chainable and self.overlap:
            self._inflight = step  # its tokens come with the next call
            return result
        return self._complete(step, result)

    def _chain(self, prev: "_InFlight") -> "_InFlight | None":
        """Launches the decode batch that follows `prev` (still in flight), or None when the
        next step needs the scheduler: someone waits, a request ends by length, blocks run
        out, a request needs more than its next token."""
        self._encode_ahead()
        if any(not self._media_blocked(r) for r in self.scheduler.waiting):
            return None
        chunks = []
        for c in prev.launched.chunks:
            r = c.request
            if r.finished:
                continue
            if r.metrics.output_tokens + 1 >= r.sampling.max_new_tokens:
                continue  # its token in `prev` is its last
            chunks.append(ScheduledChunk(r, c.start + 1, 1, pending=True))
        running = {id(c.request) for c in chunks}
        ending = {id(c.request) for c in prev.launched.chunks}
        if not chunks or any(id(r) not in running and id(r) not in ending and not self._media_blocked(r)
                             for r in self.scheduler.running):
            return None
        if not all(self.blocks.can_grow(c.request, c.start + 1) for c in chunks):
            return None
        for c in chunks:  # the blocks the scheduler would give them next anyway
            self.blocks.grow(c.request, c.start + 1)
        out = SchedulerOutput(chunks, len(chunks), [])
        if not self.runner.graphs.can_run(out):  # checked with the grown tables (a new block may cross the graphs' width)
            return None
        self._advance_sliced(out)
        t0 = time.perf_counter()
        try:
            launched = self.runner.launch(out, prev.launched)
        except Exception as e:  # noqa: BLE001 - the normal path runs these rows again
            log.warning("overlapped decode launch failed (%s); continuing step by step", e)
            return None
        self.counters.overlapped_steps += 1
        return _InFlight(out, launched, t0)

    def _complete(self, step: "_InFlight", result: StepResult | None = None) -> StepResult:
        """Waits for a launched step's tokens and applies them (requests ended meanwhile, by
        abort or by a stop token in the step before, are skipped)."""
        result = result or StepResult()
        out, t0 = step.out, step.t0
        sampled = self.runner.collect(step.launched)
        now = time.perf_counter() if step.launched.event is not None else self.runner._now()
        self._count(out, sampled)
        result.num_rows, result.num_seqs = out.num_tokens, len(out.chunks)
        vision_s = step.launched.vision.seconds if step.launched.vision is not None else 0.0
        for c in out.chunks:
            req = c.request
            if req.finished:  # failed in isolation, aborted, or stopped in the step before
                continue
            if req.metrics.scheduled_at is None:
                req.metrics.scheduled_at = t0
            if c.start < req.prompt_len:  # vision encoding is reported on its own
                req.metrics.prefill_s += now - t0 - vision_s
            req.num_computed_tokens += c.num_tokens
            self.blocks.register_computed(req)
        for c, token in sampled:
            req = c.request
            if req.finished:
                continue
            if req.metrics.first_token_at is None:
                req.metrics.first_token_at = now
            req.metrics.token_times.append(now)
            req.append_token(token)
            result.sampled.append((req, req.token_ids[-1]))  # a forced token replaces the sample
            if req.finished:
                self._finish(req)
                result.finished.append(req)
        return result

    def fail_all(self, err: EngineError) -> list[Request]:
        """Ends every request in flight with `err` (a loop fault, or close)."""
        self._inflight = None
        result = StepResult()
        for req in list(self.requests.values()):
            self._fail(req, err, result)
        return result.failed

    # ------------------------------------------------------------------ media encoded ahead
    def _encode_ahead(self) -> None:
        """Retires finished groups, launches the next, sets each prompt's media limit."""
        if self.ahead is None:
            return
        waiting = [r for r in self.scheduler.waiting if r.media]
        running = [r for r in self.scheduler.running if r.media and r.num_computed_tokens < r.prompt_len]
        if waiting or running or self.ahead.inflight:
            self.ahead.step(running + waiting, self._next_start, self.scheduler.num_decoding() > 0)

    def _advance_sliced(self, out: SchedulerOutput) -> None:
        """Sliced encode-ahead: the next encoder blocks run before this step (all of them when
        the step decodes nothing)."""
        if self.ahead is None or self.ahead.slice_rows is None:
            return
        prefill = [c for c in out.chunks if c.start < c.request.prompt_len]  # a pending decode starts past it
        self.ahead.advance(sum(c.num_tokens for c in prefill) if len(prefill) < len(out.chunks) else None)

    def _next_start(self, req: Request) -> int:
        """The token the request's next chunk starts at (a waiting one: past its cached prefix)."""
        if req.status is RequestStatus.RUNNING:
            return req.num_computed_tokens
        if req.kv is not None:
            return req.kv.computed
        return len(self.blocks.match_prefix(req)) * self.blocks.block_size

    def _media_blocked(self, req: Request) -> bool:
        """Its next tokens are media still being encoded ahead: it cannot run this step."""
        return req.media_ready_until is not None and req.media_ready_until <= self._next_start(req)

    # ------------------------------------------------------------------ internals
    def _isolate(self, out: SchedulerOutput, result: StepResult) -> list[tuple[ScheduledChunk, int]]:
        sampled = []
        for c in out.chunks:
            try:
                sampled += self.runner.execute(SchedulerOutput([c], c.num_tokens, []))
            except Exception as e:  # noqa: BLE001
                self._fail(c.request, e, result)
        return sampled

    def _fail(self, req: Request, err: BaseException, result: StepResult) -> None:
        if not isinstance(err, (UserInputError, EngineError)):
            wrapped = EngineError(f"request {req.request_id} failed in the engine: {type(err).__name__}: {err}")
            wrapped.__cause__ = err
            err = wrapped
        log.warning("request %s failed: %s", req.request_id, err)
        self.scheduler.remove(req)
        req.finish_reason, req.error = "error", err
        self.requests.pop(req.request_id, None)
        self._ended(req)
        result.failed.append(req)

    def _finish(self, req: Request) -> None:
        if req.retain is not None:
            self._apply_retain(req)
        self.scheduler.finish(req)
        self.requests.pop(req.request_id, None)
        self._ended(req)

    def _ended(self, req: Request) -> None:
        req.metrics.finished_at = time.perf_counter()
        req.mm_embeds = [None] * len(req.media)
        if self.ahead is not None:
            self.ahead.ended(req)
        if self.device.type == "cuda":
            req.metrics.peak_memory_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            req.metrics.peak_memory_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.runner.release(req)

    def _apply_retain(self, req: Request) -> None:
        """The owner keeps the cached blocks of the request's computed tokens (up to its budget):
        the next turn's prompt starts with them and finds them by name."""
        bs = self.blocks.block_size
        full = req.num_computed_tokens // bs  # the last sampled token has no K/V yet
        if req.retain.max_tokens is not None:
            full = min(full, req.retain.max_tokens // bs)
        extend_hashes(req.block_hashes, req.token_ids, req.media, bs, full, req.cache_salt)
        self.blocks.retain(req.retain.owner, self.blocks.cached_prefix(req.block_hashes[:full]))

    def _count(self, out: SchedulerOutput, sampled) -> None:
        c = self.counters
        c.steps += 1
        c.rows += out.num_tokens
        c.seqs += len(out.chunks)
        c.max_seqs = max(c.max_seqs, len(out.chunks))
        if len(sampled) > 1:
            c.decode_steps += 1

    # ------------------------------------------------------------------ KV operations (loop only)
    def move_kv(self, owner: str, start: int, end: int, shift: int) -> None:
        """K/V of tokens [start, end) of `owner`'s sequence to [start + shift, end + shift)."""
        if end <= start or not shift:
            return
        table = torch.tensor(self.blocks.owned_blocks(owner), dtype=torch.long)
        bs = self.blocks.block_size

        def slots(a: int, b: int) -> torch.Tensor:
            idx = torch.arange(a, b)
            return table[idx // bs] * bs + idx % bs

        self.runner.move_kv(slots(start, end), slots(start + shift, end + shift))
