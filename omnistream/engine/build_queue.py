"""Callers' request builds, run one at a time in arrival order by whichever caller holds the lock
(flat combining).

Under the interpreter lock, a burst of callers that each took the build lock in turn paid a
thread hand-off per request: the lock's next owner had to be woken and then win the
interpreter back from the threads already running (32 sessions asking at once, demo on CPU,
engine process: the last question queued 32-41 ms after the release for ~0.2 ms of building
each). Here a caller queues its build and takes the lock; the holder runs the builds queued
ahead of its own and, for up to FOR_OTHERS_S, those behind it, each sent to the engine as soon
as it is built, so the requests of
a burst reach the engine back to back; a caller whose build another ran finds it done when it
gets the lock. An event loop's thread runs builds only up to its own (the loop's other work
must not wait for other callers' builds), and a build that queues another runs it at once.

    builds = BuildQueue(threading.RLock())
    result = builds.run(lambda: build_and_send())   # raises what the build raised, in this thread
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from typing import Callable, Generic, TypeVar

from omnistream.errors import EngineError

T = TypeVar("T")
# how long a caller whose request is sent goes on building others' (~50 builds of a text
# follow-up on the CPU); the rest wait for the lock as before
FOR_OTHERS_S = 0.010


class BuildInterrupted(EngineError):
    """A build was cut short by an interrupt (KeyboardInterrupt, SystemExit) in the thread that
    ran it for its caller; the interrupt itself is raised in that thread."""


class _Job(Generic[T]):
    __slots__ = ("fn", "done", "value", "error")

    def __init__(self, fn: Callable[[], T]) -> None:
        self.fn, self.done = fn, False
        self.value: T | None = None
        self.error: BaseException | None = None

    def execute(self, own: bool) -> None:
        try:
            self.value = self.fn()
        except Exception as e:  # noqa: BLE001 - raised again in the caller's own thread
            self.error = e
        except BaseException as e:  # an interrupt: raised in the thread that ran the build
            self.error = e if own else BuildInterrupted(f"the build was interrupted ({type(e).__name__}) in the thread that ran it")
            raise
        finally:
            self.done = True
            self.fn = None  # the closure (a session, its prompt) is not kept alive by the queue


class BuildQueue:
    def __init__(self, lock: threading.RLock) -> None:
        self.lock = lock  # also held by callers that build without queueing (Engine.prepare)
        self._pending: collections.deque[_Job] = collections.deque()
        self._pending_lock = threading.Lock()
        self._running = threading.local()  # this thread is inside a build

    def run(self, fn: Callable[[], T], abandoned: Callable[[T], None] | None = None) -> T:
        """Runs `fn` after every build queued before it, under the lock -> its value (or raises
        its exception here). `abandoned(value)`: called when this caller is interrupted after
        its build ran (another thread may have run it), so what it made can be let go."""
        if getattr(self._running, "on", False):  # a build that queues another: at once, in place
            return fn()
        job = _Job(fn)
        with self._pending_lock:
            self._pending.append(job)
        try:
            with self.lock:
                self._drain(job, greedy=not _on_event_loop())
        except BaseException:
            with self._pending_lock:
                if job in self._pending:  # interrupted before it ran: never run, never sent
                    self._pending.remove(job)
            if job.done and job.error is None and abandoned is not None:
                abandoned(job.value)
            raise
        if job.error is not None:
            raise job.error
        return job.value

    def _drain(self, job: _Job, greedy: bool) -> None:
        """Under the lock: the queued builds in order up to `job`, then (greedy) those behind
        it for at most FOR_OTHERS_S (a steady stream of callers never keeps this caller from
        reading its own answer for longer)."""
        self._running.on = True
        done_at = None
        try:
            while True:
                with self._pending_lock:
                    if job.done:
                        done_at = time.perf_counter() if done_at is None else done_at
                        if not greedy or not self._pending or time.perf_counter() - done_at > FOR_OTHERS_S:
                            return
                    nxt = self._pending.popleft()  # ours is queued until it has run: never empty here
                nxt.execute(own=nxt is job)
        finally:
            self._running.on = False


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
