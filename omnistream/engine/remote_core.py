"""The front-end of an engine core running in its own process (engine/core_process.py).

    core = RemoteCore(cfg, recipe, model_on_meta, tokenizer.decode)   # spawns, waits until built
    h = core.submit(EngineRequest(...))      # built and checked here (BudgetError at once)
    core.run_op("retained_tokens", sid)      # a named operation (engine/ops.py), a round trip
    core.load().waiting                      # counters of the last message, no round trip
    core.close()

The client interface of EngineCore: requests are built in this process (by the caller, or by
another caller's thread: engine/build_queue.py) with the same make_request
(engine/request_factory.py) and sent whole; a reader thread feeds the handles
with the child's token batches and ends. If the child dies (killed, out of memory), every
request and operation in flight fails with an EngineError saying so, and everything after
fails at once: nothing waits for an answer that cannot come. As with the in-thread core, an
engine nobody references any more is collected (the threads hold it weakly) and its process
is told to stop.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import weakref
from pathlib import Path
from concurrent.futures import Future, TimeoutError as FutureTimeout
from multiprocessing.connection import Connection
from typing import Any, Callable

from omnistream.config import EngineConfig
from omnistream.engine.build import ModelRecipe
from omnistream.engine.core import EngineLoad, shorten_switch_interval
from omnistream.engine.core_process import ChildInfo, ChildSpec
from omnistream.engine.handle import PreparedRequest, RequestHandle
from omnistream.engine.protocol import EngineRequest, RequestMetrics, RequestOutput
from omnistream.engine.request_factory import RequestFactory
from omnistream.engine.wire import SHM_MIN_BYTES, OrderedSender, Wire, remove_leftovers
from omnistream.errors import EngineError, EngineUnavailable
from omnistream.models.interface import MultimodalLM

log = logging.getLogger(__name__)

_STARTUP_POLL_S = 0.5
_STARTUP_GRACE_S = 1.0  # a child whose build failed exits by itself within this; else it is killed
# an operation the engine process has not answered in this long is given up (a stopped or stuck
# child must not hang a server's shutdown or its /metrics; a loop between steps answers in ms)
OP_TIMEOUT_S = 30.0
_LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
_ids = itertools.count()


# `python -m` puts the working directory first on the import path: an `omnistream` folder there
# (another checkout) would run the engine on other code than the server's. -P (3.11+) leaves it
# out, and the child finds this very package first on its PYTHONPATH.
_SAFE_PATH = ["-P"] if sys.version_info >= (3, 11) else []
# a process group of its own: a terminal's Ctrl-C (SIGINT to the foreground group) reaches the
# server only, which stops the engine process itself (a Ctrl-C during startup had interrupted the
# child inside `import torch`, a traceback on the terminal)
_OWN_GROUP = {"process_group": 0} if sys.version_info >= (3, 11) else {}


def _child_env() -> dict[str, str]:
    import omnistream

    root = str(Path(omnistream.__file__).resolve().parent.parent)
    rest = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + rest if rest else "")}


class RemoteCore:
    def __init__(self, cfg: EngineConfig, recipe: ModelRecipe, model: MultimodalLM, decode: Callable[[list[int]], str]) -> None:
        """Spawns the engine process and waits until its engine is built (raises what the build
        raised there: a BudgetError of the memory budget, a ConfigError, ...). `model` is the
        front-end's copy for positions and config (the meta device is enough)."""
        self._decode = decode
        self._prefix = f"omnistream-{os.getpid()}-{next(_ids)}"
        level = logging.getLogger("omnistream").getEffectiveLevel()
        spec = ChildSpec(cfg, recipe, os.getpid(), self._prefix + "-c", level, _LOG_FORMAT)
        mine, theirs = socket.socketpair()
        # a new interpreter (CUDA must not be forked; see core_process.py for why not spawn)
        self.process = subprocess.Popen([sys.executable, *_SAFE_PATH, "-m", "omnistream.engine.core_process", "--fd", str(theirs.fileno())],
                                        pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=_child_env(),
                                        **_OWN_GROUP)
        theirs.close()  # the child's end lives in the child only: its death is our EOF
        conn = Connection(mine.detach())
        self._wire = Wire(conn, self._prefix + "-p")
        try:
            conn.send_bytes(pickle.dumps(sys.path))
            self._wire.send(spec)
        except OSError:
            pass  # it died at once: _wait_ready says so
        self._handles: dict[str, RequestHandle] = {}
        self._calls: dict[int, Future] = {}
        self._call_ids = itertools.count()
        self._lock = threading.Lock()  # _handles, _calls, _dead
        self._dead: EngineError | None = None  # why nothing can run any more
        self._closing = False
        self._load = EngineLoad(0, 0, 0, 0)  # as of the child's last message
        self._adds_sent = 0  # requests sent to the child (load(): those it has not taken yet)
        try:
            self.info = self._wait_ready()
        except BaseException:
            self._stop_starting()
            conn.close()
            raise
        self.factory = RequestFactory(model, cfg, self.info.num_blocks)
        self._out = OrderedSender(self._wire, "omnistream-engine-send")  # every message after startup
        shorten_switch_interval()
        self._reader = threading.Thread(target=_read_loop, args=(weakref.ref(self), self._wire, self._prefix),
                                        name="omnistream-engine-in", daemon=True)
        self._reader.start()
        # collected without close(): the child is told to stop (it exits on its own)
        self._finalizer = weakref.finalize(self, _tell_to_stop, self._out)
        _OPEN.add(self)

    # ------------------------------------------------------------------ client API (any thread)
    def submit(self, spec: EngineRequest) -> RequestHandle:
        """Builds the request here (raises BudgetError / UserInputError at once) and sends it."""
        return self.send(self.prepare(spec))

    def prepare(self, spec: EngineRequest) -> PreparedRequest:
        """submit()'s build and checks, without sending (send() sends)."""
        self._check_alive()
        req = self.factory.make_request(spec)
        # registered when sent: a prepared request that is never sent leaves nothing behind
        return PreparedRequest(req, RequestHandle(req.request_id, self._decode, self.abort))

    def send(self, prepared: PreparedRequest) -> RequestHandle:
        req, handle = prepared.request, prepared.handle

        def unsent(e: Exception) -> None:
            with self._lock:
                h = self._handles.pop(req.request_id, None)
                self._adds_sent -= 1  # never reaches the child: not counted as on its way (load())
            if h is not None:
                err = EngineError(f"request {req.request_id} could not be sent to the engine process: {type(e).__name__}: {e}")
                h._end(RequestOutput(req.request_id, [], None, "error", RequestMetrics(), error=err))

        # media rows (and a long conversation's (3, N) positions) go through shared memory:
        # copied there by the sender thread, not the caller, who may be building for others
        tensors = sum(item.pixel_values.nbytes for _, item in req.media) + req.positions.nbytes
        with self._lock:
            self._check_alive()  # a dead or closed engine: raised here, nothing registered or sent
            self._handles[req.request_id] = handle
            self._adds_sent += 1
        try:
            self._out.post(("add", req), heavy=tensors >= SHM_MIN_BYTES, on_error=unsent)
        except BaseException:  # an interrupt mid-write: not registered, not counted as on its way
            with self._lock:
                self._handles.pop(req.request_id, None)
                self._adds_sent -= 1
            raise
        return handle

    def abort(self, request_id: str) -> None:
        """Ends the request (finish_reason "abort"); no-op for one that already ended."""
        if self._dead is None and not self._closing:
            self._out.post(("abort", request_id))

    def run_op(self, name: str, *args: Any, timeout: float | None = None) -> Any:
        """Runs the named operation (engine/ops.py) in the child's loop, after everything sent
        before it; returns its result or raises its error (TimeoutError after `timeout` s)."""
        fut: Future = Future()
        with self._lock:
            self._check_alive()
            call_id = next(self._call_ids)
            self._calls[call_id] = fut
        self._out.post(("op", call_id, name, args), on_error=lambda e: fut.set_exception(e) if not fut.done() else None)
        try:
            return fut.result(OP_TIMEOUT_S if timeout is None else timeout)
        except FutureTimeout:
            if timeout is not None:
                raise TimeoutError(f"the engine process did not answer {name!r} within {timeout:g} s") from None
            raise EngineUnavailable(f"the engine process did not answer {name!r} within {OP_TIMEOUT_S:g} s "
                                    "(stopped or stuck)") from None
        finally:
            with self._lock:
                self._calls.pop(call_id, None)

    def post_op(self, name: str, *args: Any) -> None:
        """run_op() without waiting (errors are logged in the engine process)."""
        if self._dead is None and not self._closing:
            self._out.post(("op", None, name, args))

    def call(self, fn: Callable, timeout: float | None = None) -> Any:
        raise EngineError("the engine runs in its own process (engine_process): a function cannot be sent "
                          "to its loop; use run_op(name, *args) with an operation of engine/ops.py")

    def load(self) -> EngineLoad:
        """The child's counters as of its last message (one comes with every step that samples
        and every end): like the in-thread core's, they lag by up to a step; `waiting` also
        counts the requests sent since that the child had not taken yet (EngineLoad)."""
        load = self._load
        return load.with_unseen(self._adds_sent - load.adds_applied, self.factory.cfg.scheduler.max_num_seqs)

    @property
    def is_loop_thread(self) -> bool:
        return False  # the loop is in another process: no caller can be on it

    @property
    def alive(self) -> bool:
        return self._dead is None and not self._closing and self.process.poll() is None

    def close(self, timeout: float = 30.0) -> None:
        """Stops the engine process (requests in flight end with an EngineError) and waits for
        it to exit; one that does not is terminated, then killed."""
        if self._closing:
            return
        self._closing = True
        self._out.post(("close",))
        self._out.stop(timeout)
        self._stop_process(timeout)
        self._reader.join(timeout)  # it saw the pipe close when the child exited
        self._wire.conn.close()
        self._fail_all(EngineError("the engine was closed before the request finished"))
        self._remove_leftovers()  # again: the sender may have encoded a message after the reader's pass
        self._finalizer.detach()
        _OPEN.discard(self)

    def check_available(self) -> None:
        """Raises EngineUnavailable when no request can run any more (closed, or the engine
        process died)."""
        self._check_alive()

    # ------------------------------------------------------------------ internals
    def _check_alive(self) -> None:
        if self._dead is not None:  # without the last raise's frames: each raise would add its own
            raise self._dead.with_traceback(None)
        if self._closing:
            raise EngineUnavailable("the engine is closed")

    def _wait_ready(self) -> ChildInfo:
        conn = self._wire.conn
        while not conn.poll(_STARTUP_POLL_S):
            if self.process.poll() is not None:
                raise EngineError(f"the engine process exited during startup (exit code {self.process.returncode})")
        try:
            kind, value = self._wire.recv()
        except (EOFError, OSError):
            raise EngineError(f"the engine process exited during startup (exit code {self._exit_code(5.0)})") from None
        if kind == "failed":
            raise value
        return value

    def _on_message(self, msg: tuple) -> None:
        if msg[0] == "out":
            _, events, load = msg
            self._load = load  # first: a reader woken below sees the counters of its events
            self._dispatch(events)

    def _dispatch(self, events: list[tuple]) -> None:
        handles = self._handles
        for ev in events:
            kind = ev[0]
            if kind == "t":
                h = handles.get(ev[1])
                if h is not None:
                    h._push(ev[2], ev[3])
            elif kind == "e":
                out: RequestOutput = ev[1]
                with self._lock:
                    h = handles.pop(out.request_id, None)
                if h is not None:
                    h._end(out)
            elif kind == "r":
                _, call_id, ok, value = ev
                with self._lock:
                    fut = self._calls.get(call_id)
                if fut is not None and not fut.done():
                    fut.set_result(value) if ok else fut.set_exception(value)

    def _on_exit(self) -> None:
        """The pipe closed: the child exited (close) or died. Fails whatever still waits."""
        code = self._exit_code(5.0)
        if self._closing:
            err = EngineError("the engine was closed before the request finished")
        else:
            err = EngineUnavailable(f"the engine process died (exit code {code}): requests in flight failed; "
                                    "restart the server")
            log.error("%s", err)
        with self._lock:
            self._dead = self._dead or err
        self._fail_all(err)
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Tensor files of messages never read (a side that died): both directions."""
        for side in ("-p", "-c"):
            remove_leftovers(self._prefix + side)

    def _fail_all(self, err: EngineError) -> None:
        with self._lock:
            handles, self._handles = self._handles, {}
            calls, self._calls = self._calls, {}
        for rid, h in handles.items():
            h._end(RequestOutput(rid, list(h._tokens), None, "error", RequestMetrics(), error=err))
        for fut in calls.values():
            if not fut.done():
                fut.set_exception(err)

    def _exit_code(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def _stop_starting(self) -> None:
        """A startup that failed or was interrupted (Ctrl-C during the load): the child holds
        nothing worth a graceful stop, and while it builds it cannot read a `close` (and it
        ignores SIGINT and SIGTERM, see core_process.py). A short grace for one exiting on its
        own (its build raised), then SIGKILL. It used to wait 5 s, terminate, wait 5 s more:
        a Ctrl-C during the load took 10.6 s and printed a warning (a fresh-clone trial)."""
        if self._exit_code(_STARTUP_GRACE_S) is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)  # its own group: whatever it started too
            except (ProcessLookupError, PermissionError, AttributeError):
                self.process.kill()
            self.process.wait()

    def _stop_process(self, timeout: float) -> None:
        p = self.process
        if self._exit_code(timeout) is not None:
            return
        log.warning("engine process %s did not stop in %.0f s: terminating it", p.pid, timeout)
        p.terminate()
        if self._exit_code(5.0) is None:
            p.kill()
            p.wait()


def _tell_to_stop(out: OrderedSender) -> None:
    """A core collected without close(): the child stops (and exits) on its own; no waiting
    here, this may run inside a garbage collection."""
    out.post(("close",))
    out.stop(0.0)


def _read_loop(ref: "weakref.ref[RemoteCore]", wire: Wire, prefix: str) -> None:
    """The reader thread: every message of the child until its end of the socket closes. It
    holds the core only while it handles a message; once the core is gone it still reads (and
    so unlinks the tensor files of) what the stopping child sends."""
    while True:
        try:
            msg = wire.recv()
        except (EOFError, OSError):
            break
        except Exception:  # noqa: BLE001 - one message that does not unpickle: the rest still flows
            log.exception("engine process: a message could not be read")
            continue
        core = ref()
        if core is not None:
            core._on_message(msg)
        del core
    core = ref()
    if core is not None:
        core._on_exit()
        return
    for side in ("-p", "-c"):  # collected without close(): nobody else sweeps or closes
        remove_leftovers(prefix + side)
    wire.conn.close()


_OPEN: "weakref.WeakSet[RemoteCore]" = weakref.WeakSet()


@atexit.register
def _close_open_cores() -> None:
    """Engines never closed: stop their processes before the interpreter goes (they would exit
    on the broken pipe anyway; this is quicker and leaves no tensor files)."""
    for core in list(_OPEN):
        core.close(timeout=5.0)
