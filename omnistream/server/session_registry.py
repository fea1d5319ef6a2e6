"""The server's registry of open sessions: pinned multi-turn conversations (sessions_api.py) and
live sessions (one per /v1/realtime socket, realtime.py).

    registry = registry_of(app)                    # one per app, at state.extras["sessions"]
    entry = registry.add("session", tenant, s, close=...)   # TooManySessions (429) over the cap
    with registry.use(sid, tenant) as entry: ...   # 404 for an unknown id or another tenant's
    registry.counts()                              # {"session": n, "live": m} for /metrics

A session is visible only to the tenant that created it: another tenant's lookup is answered
exactly like an unknown id, so ids leak nothing. An entry idle for longer than
ServerConfig.session_ttl_s (and not in use) is closed by a background sweeper; at app shutdown
every entry is closed. How an entry is closed is the owner's business (`Entry.close`): a pinned
session is simply closed, a live session's socket is closed so its handler frees the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable, Iterator, Literal

from omnistream.errors import UnknownSessionError
from omnistream.server.errors import APIError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from omnistream.sessions.session import PendingAnswer, Session

log = logging.getLogger(__name__)

Kind = Literal["session", "live"]
KINDS: tuple[Kind, ...] = ("session", "live")


class TooManySessions(APIError):
    """Open sessions + live sessions at ServerConfig.max_sessions."""

    status, type, code = 429, "rate_limit_error", "too_many_sessions"


@dataclass
class Entry:
    id: str
    kind: Kind
    tenant: str | None  # the creator's tenant; nobody else sees the entry
    session: "Session"
    close: Callable[[], Awaitable[None]]  # ends it for the registry (TTL, shutdown)
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0  # requests using it now: it never expires under them
    created: float = field(default_factory=time.time)  # unix seconds
    # one question (or media upload) at a time; waiters hold no thread
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)
    active: "PendingAnswer | None" = None  # the answer streaming now (aborted when it is closed)


class SessionRegistry:
    def __init__(self, max_sessions: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()  # routes run on the event loop, session work in threads
        self._sweeper: asyncio.Task | None = None

    # ------------------------------------------------------------------ entries
    def add(self, kind: Kind, tenant: str | None, session: "Session", close: Callable[[], Awaitable[None]],
            entry_id: str | None = None) -> Entry:
        """Registers an open session (under `entry_id`, default its own id); TooManySessions
        when the server holds max_sessions (the caller still owns `session` then, and closes it)."""
        with self._lock:
            if len(self._entries) >= self.max_sessions:
                raise TooManySessions(
                    f"the server holds its maximum of {self.max_sessions} open sessions and live sessions; "
                    "close one (DELETE /v1/sessions/{id}, or close a realtime socket) or retry later")
            entry = Entry(entry_id or session.id, kind, tenant, session, close, last_used=self._clock())
            self._entries[entry.id] = entry
        return entry

    def get(self, session_id: str, tenant: str | None, kind: Kind = "session") -> Entry:
        """The tenant's entry (touched); UnknownSessionError (404) otherwise."""
        with self._lock:
            return self._lookup(session_id, tenant, kind)

    def _lookup(self, session_id: str, tenant: str | None, kind: Kind) -> Entry:
        entry = self._entries.get(session_id)
        if entry is None or entry.tenant != tenant or entry.kind != kind:
            raise UnknownSessionError(f"unknown session {session_id!r}")
        entry.last_used = self._clock()
        return entry

    def hold(self, session_id: str, tenant: str | None, kind: Kind = "session") -> Entry:
        """The tenant's entry, marked in use (the sweeper leaves it alone) until release()."""
        with self._lock:
            entry = self._lookup(session_id, tenant, kind)
            entry.busy += 1
            return entry

    def release(self, entry: Entry) -> None:
        with self._lock:
            entry.busy -= 1
            entry.last_used = self._clock()

    @contextlib.contextmanager
    def use(self, session_id: str, tenant: str | None, kind: Kind = "session") -> Iterator[Entry]:
        """hold() for the block."""
        entry = self.hold(session_id, tenant, kind)
        try:
            yield entry
        finally:
            self.release(entry)

    def touch(self, entry: Entry) -> None:
        with self._lock:
            entry.last_used = self._clock()

    def remove(self, session_id: str, tenant: str | None = None, kind: Kind | None = None, *, any_tenant: bool = False) -> Entry:
        """Takes the entry out (the caller closes it); UnknownSessionError if it is not the tenant's."""
        with self._lock:
            entry = self._entries.get(session_id)
            if entry is None or (not any_tenant and entry.tenant != tenant) or (kind is not None and entry.kind != kind):
                raise UnknownSessionError(f"unknown session {session_id!r}")
            return self._entries.pop(session_id)

    def discard(self, session_id: str) -> None:
        """Forgets the id if present (an owner that closed its session itself)."""
        with self._lock:
            self._entries.pop(session_id, None)

    def entries(self, kind: Kind | None = None) -> list[Entry]:
        """A snapshot of the open entries (tests and tools inspect it)."""
        with self._lock:
            return [e for e in self._entries.values() if kind is None or e.kind == kind]

    def counts(self) -> dict[str, int]:
        with self._lock:
            out = {k: 0 for k in KINDS}
            for e in self._entries.values():
                out[e.kind] += 1
            return out

    @property
    def open_sessions(self) -> int:
        return self.counts()["session"]

    @property
    def open_live_sessions(self) -> int:
        return self.counts()["live"]

    # ------------------------------------------------------------------ expiry and shutdown
    def take_expired(self) -> list[Entry]:
        """Removes and returns the entries idle for longer than the TTL (none in use)."""
        now = self._clock()
        with self._lock:
            old = [e for e in self._entries.values() if e.busy == 0 and now - e.last_used > self.ttl_s]
            for e in old:
                del self._entries[e.id]
        return old

    async def sweep(self) -> int:
        """Closes the expired entries; returns how many."""
        expired = self.take_expired()
        for e in expired:
            log.info("%s %s idle for more than %.0f s: closed", e.kind, e.id, self.ttl_s)
            await _close_quietly(e)
        return len(expired)

    @property
    def sweep_interval_s(self) -> float:
        # a fraction of the TTL, so an idle session lives at most ~1.25 TTL; bounded both ways
        return min(max(self.ttl_s / 4, 0.02), 10.0)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            try:
                await self.sweep()
            except Exception:  # noqa: BLE001 - the sweeper must outlive one bad close
                log.exception("session sweep failed")

    def start(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever(), name="session-sweeper")

    async def close_all(self) -> None:
        """Stops the sweeper and closes every entry (app shutdown)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        with self._lock:
            entries, self._entries = list(self._entries.values()), {}
        await asyncio.gather(*(_close_quietly(e) for e in entries))


async def _close_quietly(entry: Entry) -> None:
    try:
        await entry.close()
    except Exception:  # noqa: BLE001 - closing one must not stop the others
        log.exception("closing %s %s failed", entry.kind, entry.id)


def registry_of(app: "FastAPI") -> SessionRegistry:
    """The app's registry, created on first use with its sweeper started at startup and every
    session closed at shutdown (before the engine is closed by whoever runs the server)."""
    state = app.state.omni
    registry = state.extras.get("sessions")
    if registry is None:
        registry = SessionRegistry(state.config.max_sessions, state.config.session_ttl_s)
        state.extras["sessions"] = registry

        async def startup() -> None:
            registry.start()

        app.router.add_event_handler("startup", startup)
        app.router.add_event_handler("shutdown", registry.close_all)
    return registry
