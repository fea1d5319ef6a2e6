"""The engine core: ONE loop (a thread) owns the scheduler, the model runner, the KV blocks and
the encoder cache; nothing else touches them.

    core = EngineCore(llm, decode=tokenizer.decode)
    h = core.submit(EngineRequest(token_ids, media, sampling))   # any thread; checks at once
    for delta in h: ...                                          # deltas as tokens are produced
    core.abort(h.request_id)
    core.run_op("retained_tokens", session_id)                   # a named operation (engine/ops.py)
    core.close()

Clients (the Python API, sessions, live sessions, the server) talk to it through a FIFO inbox:
requests, aborts and operations (KV edits of a live session, releasing a session's KV) are
applied by the loop between steps, in the order they were sent. Requests of every client
share forward passes. A failure inside a step fails the request that caused it (see
LLMEngine.step); a fault of the loop itself fails the requests in flight and the loop goes on.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import queue
import sys
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, Callable, TypeVar

from omnistream.engine import ops
from omnistream.engine.handle import PreparedRequest, RequestHandle
from omnistream.engine.llm_engine import LLMEngine, StepResult
from omnistream.engine.protocol import EngineRequest, RequestOutput
from omnistream.engine.request import Request
from omnistream.errors import EngineError, EngineUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
_COLLECT_EVERY = 2000  # steps between young-generation collections while busy
# The collector is off while the loop has work (it is process-wide: a server's event loop and
# client threads run without it too). Under constant load the loop is never idle, so the older
# generations must be collected on a clock as well, or cyclic garbage (asyncio, HTTP, exception
# tracebacks) piles up for as long as the load lasts (soak: +100 MiB in 8 minutes).
_FULL_COLLECT_S = 10.0
_IDLE_POLL_S = 0.5  # an idle loop wakes this often to see whether its engine is still in use
# The loop shares the interpreter lock with every client thread (request building, media,
# a server's event loop). A thread that wants the lock waits up to the switch interval (5 ms by
# default) for the holder to drop it: 32 threads building requests at once kept the loop from
# launching its next step for 5-15 ms (H200 burst timeline, tools/gpu_step_timeline.py). The
# loop asks for a shorter interval, process-wide (set OMNISTREAM_KEEP_SWITCH_INTERVAL=1 to opt out).
_SWITCH_INTERVAL_S = 0.0005


@dataclass(frozen=True)
class EngineLoad:
    """Cheap counters a client reads without a round trip through the loop (a server's load
    checks and gauges): read off the loop, so they may lag a step behind, except `waiting`,
    which also counts the requests sent but not yet seen by the loop beyond the sequence slots
    that were free (a burst is counted at once: --max-queued-requests let a burst of 100
    through a limit of 10, a fresh-clone trial)."""

    waiting: int  # requests queued, not yet admitted (see above)
    running: int  # requests admitted (prefilling or decoding)
    kv_blocks_free: int
    vision_tokens_encoded: int  # tokens the vision tower produced so far
    adds_applied: int = 0  # requests the loop has taken from its inbox so far

    def with_unseen(self, unseen: int, max_num_seqs: int) -> "EngineLoad":
        """These counters plus `unseen` requests on their way to the loop: those beyond the
        free sequence slots will wait (KV space is not counted: an estimate from above)."""
        free = max(0, max_num_seqs - self.running - self.waiting)
        return replace(self, waiting=self.waiting + max(0, unseen - free))


class EngineCore:
    def __init__(self, llm: LLMEngine, decode: Callable[[list[int]], str]) -> None:
        self.llm = llm
        self._decode = decode
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._adds_sent = self._adds_applied = 0  # requests put in the inbox / taken from it (load())
        self._count_lock = threading.Lock()
        self._handles: dict[str, RequestHandle] = {}  # loop only
        self._closed = False
        self._steps = 0
        self._collected_at = time.monotonic()  # last full collection while busy
        # the thread holds the core only while it works: an engine nobody references any more
        # is collected, and its loop ends within _IDLE_POLL_S
        shorten_switch_interval()
        self._thread = threading.Thread(target=_loop_main, args=(weakref.ref(self),), name="omnistream-engine", daemon=True)
        self._thread.start()
        _OPEN.add(self)

    # ------------------------------------------------------------------ client API (any thread)
    def submit(self, spec: EngineRequest) -> RequestHandle:
        """Queues a request; raises BudgetError / UserInputError at once for one that can
        never run (nothing is queued then)."""
        return self.send(self.prepare(spec))

    def prepare(self, spec: EngineRequest) -> PreparedRequest:
        """submit()'s build and checks, without queueing (send() queues)."""
        self._check_open()
        req = self.llm.make_request(spec)
        return PreparedRequest(req, RequestHandle(req.request_id, self._decode, self.abort))

    def send(self, prepared: PreparedRequest) -> RequestHandle:
        self.add(prepared.request, prepared.handle)
        return prepared.handle

    def add(self, req: Request, handle: Any) -> None:
        """Queues a request already built by make_request; `handle` receives its tokens
        (`_push(token, logprob)`) and its end (`_end(RequestOutput)`) from the loop (a
        RequestHandle, or the engine process's forwarder: engine/core_process.py)."""
        self._check_open()
        with self._count_lock:
            self._adds_sent += 1
        self._inbox.put(("add", req, handle))

    def abort(self, request_id: str) -> None:
        """Ends the request (finish_reason "abort"); no-op for one that already ended."""
        if not self._closed:
            self._inbox.put(("abort", request_id))

    def call(self, fn: Callable[[LLMEngine], T], timeout: float | None = None) -> T:
        """Runs fn(llm) in the loop, after everything sent before it; returns its result or
        raises its error."""
        if threading.current_thread() is self._thread:
            return fn(self.llm)
        self._check_open()
        fut: Future = Future()
        self._inbox.put(("call", fn, fut))
        return fut.result(timeout)

    def post(self, fn: Callable[[LLMEngine], Any]) -> None:
        """Like call() without waiting (errors are logged): releases at close time."""
        if not self._closed:
            self._inbox.put(("call", fn, None))

    def run_op(self, name: str, *args: Any, timeout: float | None = None) -> Any:
        """Runs the named operation (engine/ops.py) in the loop, after everything sent before
        it; returns its result or raises its error. Library and server code use these (they
        work against a core in another process too), never call()."""
        fn = ops.resolve(name)
        return self.call(lambda llm: fn(llm, *args), timeout)

    def post_op(self, name: str, *args: Any) -> None:
        """run_op() without waiting (errors are logged)."""
        fn = ops.resolve(name)
        self.post(lambda llm: fn(llm, *args))

    def load(self) -> EngineLoad:
        """counters(), with the requests still in the inbox counted as waiting (EngineLoad)."""
        load = self.counters()
        return load.with_unseen(self._adds_sent - load.adds_applied, self.llm.cfg.scheduler.max_num_seqs)

    def counters(self) -> EngineLoad:
        """The loop's own counters, nothing estimated (what an engine process reports: its
        parent adds what it sent since)."""
        # lengths read off the loop (atomic in CPython): a round trip would wait for a step. The
        # count of adds first: one the loop applies between the reads is then in both counts
        # (counted twice), never in neither
        applied, llm = self._adds_applied, self.llm
        return EngineLoad(len(llm.scheduler.waiting), len(llm.scheduler.running), llm.blocks.num_free,
                          llm.runner.vision_tokens_encoded, applied)

    @property
    def alive(self) -> bool:
        """False once closed or once its loop has ended."""
        return not self._closed and self._thread.is_alive()

    @property
    def is_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def close(self, timeout: float = 30.0) -> None:
        """Stops the loop; requests still in flight end with an EngineError."""
        if self._closed:
            return
        self._inbox.put(("close",))
        self._closed = True
        self._thread.join(timeout)

    def check_available(self) -> None:
        """Raises EngineUnavailable when no request can run any more (the engine is closed)."""
        self._check_open()

    def _check_open(self) -> None:
        if self._closed:
            raise EngineUnavailable("the engine is closed")

    # ------------------------------------------------------------------ the loop
    def _iterate(self) -> bool:
        """Applies the queued commands (waiting up to _IDLE_POLL_S when idle), then runs one
        step if there is work. False when the loop must end."""
        if not self._drain(block=not self.llm.has_work()):
            gc.enable()
            self._fail_all(EngineError("the engine was closed before the request finished"))
            return False
        if not self.llm.has_work():
            gc.enable()  # idle: let the collector run outside steps
            return True
        gc.disable()  # a full collection inside a step stalled prefills by 10-25 ms (H100)
        try:
            self._deliver(self.llm.step())
        except Exception as e:  # noqa: BLE001 - a fault of the loop: fail what is in flight
            log.exception("engine step failed outside any request")
            self._fail_all(EngineError(f"engine fault: {type(e).__name__}: {e}"))
        self._steps += 1
        if self._steps % _COLLECT_EVERY == 0:
            gc.collect(0)
        now = time.monotonic()
        if now - self._collected_at >= _FULL_COLLECT_S:
            gc.collect()
            self._collected_at = time.monotonic()
        return True

    def _drain(self, block: bool) -> bool:
        """Applies every queued command (waits for one when idle); False on close."""
        try:
            cmd = self._inbox.get(timeout=_IDLE_POLL_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if cmd[0] == "close":
                return False
            self._apply(cmd)
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            _, req, handle = cmd
            try:
                self.llm.add(req)
            except Exception as e:  # noqa: BLE001
                req.finish_reason, req.error = "error", e
                handle._end(self._output(req))
                return
            finally:  # after the add: a load() in between counts it twice, never not at all
                self._adds_applied += 1  # the loop's thread only
            self._handles[req.request_id] = handle
        elif kind == "abort":
            req = self.llm.abort(cmd[1])
            if req is not None:
                self._end(req)
        elif kind == "call":
            _, fn, fut = cmd
            try:
                value = fn(self.llm)
            except Exception as e:  # noqa: BLE001
                if fut is None:
                    log.warning("engine operation failed: %s", e)
                else:
                    fut.set_exception(e)
            else:
                if fut is not None:
                    fut.set_result(value)

    def _deliver(self, res: StepResult) -> None:
        for req, token in res.sampled:
            handle = self._handles.get(req.request_id)
            if handle is not None:
                handle._push(token, req.logprobs[-1] if req.logprobs else None)
        for req in res.finished + res.failed:
            self._end(req)

    def _end(self, req: Request) -> None:
        handle = self._handles.pop(req.request_id, None)
        if handle is not None:
            handle._end(self._output(req))

    def _fail_all(self, err: EngineError) -> None:
        for req in self.llm.fail_all(err):
            self._end(req)

    @staticmethod
    def _output(req: Request) -> RequestOutput:
        # text stays None: the handle decodes it in the reader's thread
        return RequestOutput(
            request_id=req.request_id, token_ids=req.output_ids, text=None, finish_reason=req.finish_reason,
            metrics=req.metrics, logits=req.logits, logprobs=req.logprobs, error=req.error,
        )


def shorten_switch_interval() -> None:
    """The process-wide switch interval down to _SWITCH_INTERVAL_S (see there), unless
    OMNISTREAM_KEEP_SWITCH_INTERVAL is set. The front-end of an engine process asks for it too:
    its reader thread hands tokens to the handles and must not wait 5 ms behind an event loop."""
    if not os.environ.get("OMNISTREAM_KEEP_SWITCH_INTERVAL"):
        sys.setswitchinterval(min(sys.getswitchinterval(), _SWITCH_INTERVAL_S))


_OPEN: "weakref.WeakSet[EngineCore]" = weakref.WeakSet()  # cores whose loop may still run


@atexit.register
def _close_open_cores() -> None:
    """A loop thread still inside a torch op when the interpreter tears down aborts the
    process ("terminate called without an active exception"): stop every loop first."""
    for core in list(_OPEN):
        core.close(timeout=5.0)


def _name_native_thread(name: str) -> None:
    """The OS-level name of the calling thread (top -H, py-spy, /proc/<pid>/task/<tid>/comm show
    it; Python before 3.14 leaves every thread named after the process). Linux only; 15 bytes."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _loop_main(ref: "weakref.ref[EngineCore]") -> None:
    _name_native_thread("omni-engine")
    core = ref()
    if core is not None:
        core.llm.enter_loop_thread()  # e.g. its CUDA stream (engine/encode_ahead.py)
        del core
    while True:
        core = ref()
        if core is None or not core._iterate():
            return
        del core  # no strong reference while waiting for the next iteration
