"""Callers' request builds, run one at a time in arrival order by whichever caller holds the lock
(flat combining).

Under the interpreter lock, a burst of callers that each took the build lock in turn paid a
thread hand-off per request: the lock's next owner had to be woken and then win the
interpreter back from the threads already running (32 sessions asking at once, demo on CPU,
engine process: the last question queued 32-41 ms after the release for ~0.2 ms of building
each). Here a caller queues its build and takes the lock; the holder runs every build queued so
far, each sent to the engine as soon as it is built, so the requests of a burst reach the engine
back to back; a caller whose build another ran finds it done when it gets the lock.

    builds = BuildQueue(threading.RLock())
    result = builds.run(lambda: build_and_send())   # raises what the build raised, in this thread
"""

from __future__ import annotations

import collections
import threading
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class _Job(Generic[T]):
    __slots__ = ("fn", "done", "value", "error")

    def __init__(self, fn: Callable[[], T]) -> None:
        self.fn, self.done = fn, False
        self.value: T | None = None
        self.error: BaseException | None = None

    def execute(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's own thread
            self.error = e
        self.done = True
        self.fn = None  # the closure (a session, its prompt) is not kept alive by the queue


class BuildQueue:
    def __init__(self, lock: threading.RLock) -> None:
        self.lock = lock  # also held by callers that build without queueing (Engine.prepare)
        self._pending: collections.deque[_Job] = collections.deque()
        self._pending_lock = threading.Lock()

    def run(self, fn: Callable[[], T]) -> T:
        """Runs `fn` after every build queued before it, under the lock -> its value (or raises
        its exception here). Re-entrant: a build that queues another runs it at once."""
        job = _Job(fn)
        with self._pending_lock:
            self._pending.append(job)
        with self.lock:
            while not job.done:
                with self._pending_lock:
                    batch, self._pending = self._pending, collections.deque()
                for j in batch:
                    j.execute()
        if job.error is not None:
            raise job.error
        return job.value
