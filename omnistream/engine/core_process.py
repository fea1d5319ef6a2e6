"""The engine core in its own process (the child side; engine/remote_core.py is the parent's).

    parent                                   child (a new interpreter: CUDA must not be forked)
    RemoteCore.submit -> make_request        builds model + LLMEngine (engine/build.py), runs an
      ("add", Request) ------------------->  EngineCore; its loop thread owns the GPU state
      ("abort", id) / ("op", n, name, args)  main thread: receives, applies (core.add/abort/post)
      ("close",)                             sender thread: drains the outbox, one message
    reader thread <----------------------    ("out", events, load) per drain, not per token
      handle._push / _end, op results

The child's interpreter lock is shared only by its loop, its receiver and its sender: the
parent's HTTP parsing, JSON, media decoding and SSE never delay a step's launch.

Events of one "out" message keep the loop's order: ("t", request id, token, logprob),
("e", RequestOutput), ("r", call id, ok, value or error). `load` (engine/core.py EngineLoad) rides
on every message, so the parent's load checks and gauges need no round trip. Errors are sent as they are when they pickle, else as an EngineError
with their text. The child is `python -m omnistream.engine.core_process --fd N` on one end of a
socketpair, not a multiprocessing spawn: spawn re-runs the parent's main script in the child,
and a user's script without an `if __name__ == "__main__"` guard would build a second engine
there. The first message is the parent's sys.path (so the recipe's module imports), the second
the ChildSpec. The child exits when the parent closes it, when the pipe breaks, or when the
parent process is gone (a watchdog: it must never outlive the parent). It ignores SIGINT and
SIGTERM: a terminal's Ctrl-C reaches the whole process group and systemd signals the whole
cgroup, but the parent decides when the engine stops (after its graceful shutdown, whose
requests still need the engine).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import pickle
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

from omnistream.config import EngineConfig
from omnistream.engine import ops
from omnistream.engine.build import ModelRecipe, build_llm
from omnistream.engine.core import EngineCore
from omnistream.engine.protocol import RequestOutput
from omnistream.engine.request import Request
from omnistream.engine.wire import Wire
from omnistream.errors import EngineError

log = logging.getLogger(__name__)

_WATCH_PARENT_S = 0.5


@dataclass(frozen=True)
class ChildSpec:
    """What the child needs to build its engine (picklable)."""

    cfg: EngineConfig
    recipe: ModelRecipe
    parent_pid: int
    shm_prefix: str  # of the tensors the child sends
    log_level: int  # the parent's level of the "omnistream" logger
    log_format: str


@dataclass(frozen=True)
class ChildInfo:
    """What the child reports once its engine is built."""

    pid: int
    num_blocks: int
    block_size: int


def portable_error(err: BaseException) -> BaseException:
    """`err` if it survives pickling as itself, else an EngineError with its text."""
    try:
        back = pickle.loads(pickle.dumps(err))
        if type(back) is type(err) and str(back) == str(err):
            return err
    except Exception:  # noqa: BLE001 - any failure to round-trip: send the text
        pass
    return EngineError(f"{type(err).__name__}: {err}")


class _Outbox:
    """Events from the loop (and the receiver) waiting for the sender thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._events: list[tuple] = []
        self.closed = False

    def put(self, event: tuple) -> None:
        with self._cond:
            self._events.append(event)
            if len(self._events) == 1:  # the sender sleeps only when it found nothing
                self._cond.notify()

    def take(self) -> list[tuple] | None:
        """Every event so far (waits for one); None once closed and empty."""
        with self._cond:
            while not self._events and not self.closed:
                self._cond.wait()
            events, self._events = self._events, []
        return events or None

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify()


class _Forwarder:
    """The loop's handle of a request in the child: tokens and the end go to the outbox."""

    __slots__ = ("request_id", "_outbox")

    def __init__(self, request_id: str, outbox: _Outbox) -> None:
        self.request_id = request_id
        self._outbox = outbox

    def _push(self, token: int, logprob) -> None:
        self._outbox.put(("t", self.request_id, token, logprob))

    def _end(self, out: RequestOutput) -> None:
        if out.error is not None:
            out.error = portable_error(out.error)
        self._outbox.put(("e", out))


class _Child:
    def __init__(self, wire: Wire, core: EngineCore, pin_media: bool) -> None:
        self.wire = wire
        self.core = core
        self.pin_media = pin_media
        self.outbox = _Outbox()
        self.sender = threading.Thread(target=self._send_loop, name="omnistream-engine-out", daemon=True)
        self.sender.start()

    def serve(self) -> None:
        """Applies the parent's commands until it closes the engine or goes away."""
        while True:
            try:
                msg = self.wire.recv()
            except (EOFError, OSError):
                log.info("engine process: the parent is gone, stopping")
                break
            if msg[0] == "close":
                break
            self._apply(msg)
        self.core.close()  # requests still in flight end with an EngineError (sent before we exit)
        self.outbox.close()
        self.sender.join(10.0)

    def _apply(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "add":
            req: Request = msg[1]
            if self.pin_media:
                _pin_media(req)
            self.core.add(req, _Forwarder(req.request_id, self.outbox))
        elif kind == "abort":
            self.core.abort(msg[1])
        elif kind == "op":
            _, call_id, name, args = msg
            self._op(call_id, name, args)

    def _op(self, call_id: int | None, name: str, args: tuple) -> None:
        outbox = self.outbox
        try:
            fn = ops.resolve(name)
        except ValueError as e:
            if call_id is not None:
                outbox.put(("r", call_id, False, e))
            return

        def run(llm) -> None:
            try:
                value = fn(llm, *args)
            except Exception as e:  # noqa: BLE001 - the caller gets it
                if call_id is None:
                    log.warning("engine operation %s failed: %s", name, e)
                else:
                    outbox.put(("r", call_id, False, portable_error(e)))
                return
            if call_id is not None:
                outbox.put(("r", call_id, True, value))

        self.core.post(run)

    def _send_loop(self) -> None:
        while True:
            events = self.outbox.take()
            if events is None:
                return
            load = self.core.counters()  # read after the events: it includes their effects
            try:
                self.wire.send(("out", events, load))
            except (OSError, EOFError, ValueError):
                return  # the parent is gone; the receiver sees it too
            except Exception as e:  # noqa: BLE001 - an event that does not pickle: say so, once per message
                log.exception("engine process: could not send %d events", len(events))
                self._send_failure(events, e)

    def _send_failure(self, events: list[tuple], err: Exception) -> None:
        """Ends the requests and calls of a message that could not be sent, with the reason."""
        why = EngineError(f"engine process: result could not be sent: {type(err).__name__}: {err}")
        fixed = []
        for ev in events:
            if ev[0] == "e":
                out = ev[1]
                fixed.append(("e", RequestOutput(out.request_id, out.token_ids, None, "error", out.metrics, error=why)))
            elif ev[0] == "r":
                fixed.append(("r", ev[1], False, why))
            else:
                fixed.append(ev)
        try:
            self.wire.send(("out", fixed, self.core.counters()))
        except Exception:  # noqa: BLE001 - nothing more to do: the parent sees its requests hang up at close
            log.exception("engine process: could not send the failure either")


def _pin_media(req: Request) -> None:
    """Media rows arrive in (unpinned) shared memory; the runner copies them to the GPU
    asynchronously, which needs page-locked memory (the front-end pins nothing: it holds no
    CUDA context)."""
    for _, item in req.media:
        if not item.pixel_values.is_pinned():
            item.pixel_values = item.pixel_values.pin_memory()


def _watch_parent(parent_pid: int) -> None:
    """Exits the process when the parent is gone (reparented: getppid changes), even if the
    main thread is stuck; the pipe's EOF is the usual way out."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(3)
        time.sleep(_WATCH_PARENT_S)


def main(argv: list[str] | None = None) -> None:
    """The engine process's entry point: `python -m omnistream.engine.core_process --fd N`."""
    _ignore_stop_signals()  # first: a Ctrl-C during the imports is the parent's too
    parser = argparse.ArgumentParser(prog="omnistream.engine.core_process")
    parser.add_argument("--fd", type=int, required=True, help="this end of the socketpair to the front-end")
    args = parser.parse_args(argv)
    conn = Connection(args.fd)
    sys.path[:] = pickle.loads(conn.recv_bytes())  # before the spec: its recipe names a module
    spec = Wire(conn, "").recv()
    child_main(conn, spec)


def _ignore_stop_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def child_main(conn: Connection, spec: ChildSpec) -> None:
    _ignore_stop_signals()
    logging.basicConfig(level=logging.WARNING, format=spec.log_format)
    logging.getLogger("omnistream").setLevel(spec.log_level)
    threading.Thread(target=_watch_parent, args=(spec.parent_pid,), name="omnistream-parent-watch", daemon=True).start()
    wire = Wire(conn, spec.shm_prefix)
    try:
        llm = build_llm(spec.recipe(spec.cfg), spec.cfg)
        gc.collect()
        gc.freeze()  # weights and tables out of the collector's way (as Engine does)
        core = EngineCore(llm, decode=_no_decode)
    except BaseException as e:  # noqa: BLE001 - the parent raises it (BudgetError of the budget, ...)
        wire.send(("failed", portable_error(e)))
        return
    wire.send(("ready", ChildInfo(os.getpid(), llm.blocks.num_blocks, llm.blocks.block_size)))
    _Child(wire, core, pin_media=torch.device(spec.cfg.device).type == "cuda").serve()


def _no_decode(token_ids: list[int]) -> str:
    raise AssertionError("the engine process never decodes: the front-end's handles do")


if __name__ == "__main__":  # run as the module proper (not __main__): its classes keep their pickled names
    from omnistream.engine.core_process import main as _main

    _main()
