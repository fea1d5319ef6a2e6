"""Callers' request builds, run one at a time in arrival order by one caller at a time, the lead
(flat combining).

Under the interpreter lock, a burst of callers that each took the build lock in turn paid a
thread hand-off per request: the lock's next owner had to be woken and then win the
interpreter back from the threads already running (32 sessions asking at once, demo on CPU,
engine process: the last question queued 32-41 ms after the release for ~0.2 ms of building
each). Here a caller queues its build; if no caller leads, it leads: under the lock it runs the
builds queued ahead of its own, its own and, for up to FOR_OTHERS_S, those behind it, each sent
to the engine as soon as it is built, so the requests of a burst reach the engine back to back.
A caller whose build the lead ran is woken with its result and returns without the lock; when
the lead stops, it hands the lead to the first build still queued. An event loop's thread or
the main thread, leading, runs builds only up to its own (the loop's other work must not wait
for other callers' builds, nor an interrupt meant for the main thread land in them); a build
that queues another, or a caller already holding the lock, runs it at once.

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
# how long a lead whose own request is sent goes on building the ones behind it (~50 builds of a
# text follow-up on the CPU) before it hands the lead on
FOR_OTHERS_S = 0.010
_WAKE_POLL_S = 0.05  # a waiting caller looks again this often (a lost wake-up, not the normal path)


class BuildInterrupted(EngineError):
    """A build was cut short by an interrupt (KeyboardInterrupt, SystemExit) in the thread that
    ran it for its caller; the interrupt itself is raised in that thread."""


class _Job(Generic[T]):
    __slots__ = ("fn", "abandoned", "done", "running", "gone", "value", "error", "wake")

    def __init__(self, fn: Callable[[], T], abandoned: Callable[[T], None] | None) -> None:
        self.fn, self.abandoned = fn, abandoned
        self.done = self.running = self.gone = False  # running: the lead took it; gone: its caller left
        self.value: T | None = None
        self.error: BaseException | None = None
        self.wake = threading.Event()  # set when it has run, or when its caller is handed the lead

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
            self.wake.set()

    def let_go(self) -> None:
        """Its caller left after it ran: what it made (a sent request) is let go."""
        if self.error is None and self.abandoned is not None:
            self.abandoned(self.value)


class BuildQueue:
    def __init__(self, lock: threading.RLock) -> None:
        self.lock = lock  # held by the lead; also by callers that build without queueing (Engine.prepare)
        self._pending: collections.deque[_Job] = collections.deque()  # a job leaves it once it has run
        self._state = threading.Lock()  # _pending, _lead, and each job's running / gone
        self._lead: _Job | None = None  # the job whose caller leads (runs builds) now
        self._running = threading.local()  # this thread is inside a build

    def run(self, fn: Callable[[], T], abandoned: Callable[[T], None] | None = None) -> T:
        """Runs `fn` after every build queued before it, under the lock -> its value (or raises
        its exception here). `abandoned(value)`: called once when this caller is interrupted
        and its build ran anyway (perhaps in another thread), so what it made can be let go."""
        if getattr(self._running, "on", False) or self.lock._is_owned():  # noqa: SLF001
            return fn()  # a build that queues another, or a caller holding the lock: at once, in place
        job = _Job(fn, abandoned)
        try:
            with self._state:
                self._pending.append(job)
                if self._lead is None:
                    self._lead = job
            # until it has run or its caller is handed the lead (a wake-up lost to an interrupt
            # in the thread that gave it costs one poll, not the caller)
            while not job.done and self._lead is not job:
                job.wake.wait(_WAKE_POLL_S)
            if not job.done:
                self._lead_builds(job)
        except BaseException:
            self._give_up(job)
            raise
        if job.error is not None:
            raise job.error
        return job.value

    def _lead_builds(self, job: _Job) -> None:
        """As the lead, under the lock: the queued builds in order up to `job`, then (unless on
        an event loop or the main thread) those behind it for up to FOR_OTHERS_S; then the lead
        passes on. A job leaves the queue only once it has run: one cut off by an interrupt
        before it started is run by the next lead."""
        greedy = not _on_event_loop() and threading.current_thread() is not threading.main_thread()
        done_at = None
        self._running.on = True
        try:
            with self.lock:
                while True:
                    with self._state:
                        while self._pending and self._pending[0].done:
                            self._pending.popleft()
                        if job.done:
                            done_at = time.perf_counter() if done_at is None else done_at
                            if not greedy or not self._pending or time.perf_counter() - done_at > FOR_OTHERS_S:
                                return
                        nxt = self._pending[0]  # ours is queued until it has run: never empty here
                    try:
                        nxt.running = True
                        nxt.execute(own=nxt is job)
                    finally:  # run (an interrupt inside counts): it leaves the queue; cut off before: it stays
                        with self._state:
                            nxt.running = False
                            if (nxt.done or nxt.gone) and nxt in self._pending:
                                self._pending.remove(nxt)
                            gone = nxt.gone
                    if gone:
                        nxt.let_go()
        finally:
            self._running.on = False
            self._pass_lead(job)

    def _pass_lead(self, job: _Job) -> None:
        with self._state:
            if self._lead is not job:
                return
            self._lead = nxt = next((j for j in self._pending if not j.done), None)
        if nxt is not None:
            nxt.wake.set()  # not done: its caller leads now

    def _give_up(self, job: _Job) -> None:
        """An interrupted caller: its build, if not started, is never run; one running in the
        lead is let go by the lead once it has run; one that has run is let go here; a lead
        handed to it goes to the next build."""
        with self._state:
            ran = job.done
            if not ran:
                job.gone = True
                if not job.running and job in self._pending:
                    self._pending.remove(job)
        self._pass_lead(job)
        if ran:
            job.let_go()


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
