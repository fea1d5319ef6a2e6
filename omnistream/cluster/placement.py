"""Where a request goes: the routing key of a request and the choice among replicas. Pure
logic (no Ray): the router (router.py) feeds it what Ray Serve hands a request router.

A pinned session's id names the replica that holds it: a replica sets its engine's session id
prefix to `s-<replica>-` (replica.py), so `s-k3x9q2ab-5f0c1d2e3a4b` lives on replica
`k3x9q2ab`. The id *is* the placement table: every router (one per Ray Serve proxy, on every
host) routes a session's requests to its replica with no shared state, a restarted router has
nothing to rebuild, and a request for a session whose replica is gone is recognised as such by
any replica (lost.py answers it 410). Why not a table filled at placement time: Serve's router
picks a replica before the request runs and never sees the response, so it cannot learn the id
of the session it just placed; the replicas' periodic reports would leave a gap in which a
follow-up is misrouted.

Routes (what a request asks of the cluster):
    SESSION   a request of an open session: X-Session-Id, /v1/sessions/{id}[/...] (fork too:
              the copy shares the original's KV, so it opens on the same replica)
    OPEN      a request that opens a session here: POST /v1/sessions, the /v1/realtime socket
              (one socket = one live session: every later event rides on that connection)
    STATELESS anything else (chat completions without a session, /v1/models, /health, ...);
              a chat completion carries the prefix keys of its prompt (PREFIX_HEADER, written
              by Serve's proxy: prefix_ingress.py), by which the router sends it where its
              prefix is likely cached (prefix_affinity.py)
    TARGET    an internal call addressed to one replica (ops.py's fan-out), key `replica:<name>`
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

SESSION_ID_RE = re.compile(r"^s-([A-Za-z0-9_]+)-[0-9a-f]+$")
REPLICA_NAME_RE = re.compile(r"^[A-Za-z0-9_]+$")
TARGET_PREFIX = "replica:"  # an internal call's session_id key: replica:<name>
SESSION_HEADER = b"x-session-id"
PREFIX_HEADER = b"x-omnistream-prefix-keys"  # a stateless request's prefix keys, comma-separated (prefix_keys.py)
PREFIX_KEY_RE = re.compile(r"^[0-9a-f]{16}$")
MAX_PREFIX_KEYS = 8  # read of the header at most (prefix_keys.py writes 4)
REPLICA_HEADER = "x-omnistream-replica"  # every response says which replica served it


class Kind(enum.Enum):
    SESSION = "session"
    OPEN = "open"
    STATELESS = "stateless"
    TARGET = "target"


@dataclass(frozen=True)
class Route:
    kind: Kind
    replica: str | None = None  # SESSION / TARGET: the replica it must go to (None: the id names none)
    session_id: str | None = None
    prefix_keys: tuple[str, ...] = ()  # STATELESS: its prompt's prefix keys, shallowest first


# ---------------------------------------------------------------------------------- ids
def session_id_prefix(replica: str) -> str:
    """The engine's session id prefix on `replica`."""
    if not REPLICA_NAME_RE.match(replica):
        raise ValueError(f"replica name {replica!r} cannot go into a session id (letters, digits, _)")
    return f"s-{replica}-"


def replica_of(session_id: str | None) -> str | None:
    """The replica a session id names, or None (not a cluster session id)."""
    m = SESSION_ID_RE.match(session_id or "")
    return m.group(1) if m else None


def target_key(replica: str) -> str:
    return TARGET_PREFIX + replica


# ---------------------------------------------------------------------------------- routes
def route_of_key(key: str | None) -> Route:
    """The route of an X-Session-Id value (or an internal call's key)."""
    if not key:
        return Route(Kind.STATELESS)
    if key.startswith(TARGET_PREFIX):
        return Route(Kind.TARGET, key[len(TARGET_PREFIX):])
    return Route(Kind.SESSION, replica_of(key), key)


def route_of_scope(scope: Mapping[str, Any], session_key: str | None = None) -> Route:
    """The route of an HTTP request or WebSocket from its ASGI scope; `session_key`: the
    X-Session-Id Serve's proxy read from the headers (read from the scope when None)."""
    path = scope.get("path", "")[len(scope.get("root_path", "")):] or "/"
    if scope.get("type") == "websocket":
        return Route(Kind.OPEN) if path.rstrip("/") == "/v1/realtime" else Route(Kind.STATELESS)
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["v1", "sessions"]:
        if len(parts) == 2:
            return Route(Kind.OPEN) if scope.get("method") == "POST" else Route(Kind.STATELESS)
        return Route(Kind.SESSION, replica_of(parts[2]), parts[2])
    if session_key is None:
        session_key = header_of(scope, SESSION_HEADER)
    route = route_of_key(session_key)
    if route.kind is Kind.STATELESS:
        return Route(Kind.STATELESS, prefix_keys=prefix_keys_of(header_of(scope, PREFIX_HEADER)))
    return route


def prefix_keys_of(value: str | None) -> tuple[str, ...]:
    """The keys of a PREFIX_HEADER value (malformed ones left out)."""
    if not value:
        return ()
    return tuple(k for k in (part.strip() for part in value.split(",")[:MAX_PREFIX_KEYS]) if PREFIX_KEY_RE.match(k))


def header_of(scope: Mapping[str, Any], name: bytes) -> str | None:
    """The value of header `name` (lower case) of an ASGI scope, or None."""
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value.decode("latin-1")
    return None


# ---------------------------------------------------------------------------------- load
@dataclass(frozen=True)
class ReplicaLoad:
    """What a replica last reported (its routing stats), plus the sessions this router placed
    on it since (not in the report yet)."""

    name: str
    sessions: int = 0  # open pinned + live sessions
    max_sessions: int = 1
    kv_used: int = 0  # KV blocks in use
    kv_total: int = 1
    queued: int = 0  # engine requests running + waiting
    placed_since_report: int = 0

    @classmethod
    def from_stats(cls, name: str, stats: Mapping[str, Any] | None, placed: int = 0) -> "ReplicaLoad":
        s = stats or {}
        return cls(name, int(s.get("sessions", 0)), max(1, int(s.get("max_sessions", 1))), int(s.get("kv_used", 0)),
                   max(1, int(s.get("kv_total", 1))), int(s.get("queued", 0)), placed)

    @property
    def session_score(self) -> float:
        """Share of the session slots plus share of the KV pool in use: both fill up with
        sessions (a live session holds its frames' KV for its lifetime)."""
        return (self.sessions + self.placed_since_report) / self.max_sessions + self.kv_used / self.kv_total


def rank_for_sessions(loads: Iterable[ReplicaLoad]) -> list[str]:
    """Replica names, least loaded first (by sessions and KV, then engine queue, then name so
    every router breaks ties alike)."""
    return [r.name for r in sorted(loads, key=lambda r: (r.session_score, r.queued, r.name))]


@dataclass
class PlacementLedger:
    """Sessions this router placed per replica since that replica's last report: the reports
    come every few seconds, so without this a burst of new sessions would all land on the
    replica that was least loaded at the last report."""

    _placed: dict[str, set[str]] = field(default_factory=dict)  # replica -> request ids placed there
    _report: dict[str, Any] = field(default_factory=dict)  # replica -> the report id last seen

    def observe_report(self, replica: str, report_id: Any) -> None:
        if self._report.get(replica) != report_id:
            self._report[replica] = report_id
            self._placed.pop(replica, None)

    def placed(self, replica: str) -> int:
        return len(self._placed.get(replica, ()))

    def record(self, replica: str, request_id: str) -> None:
        """A request opening a session goes to `replica` (idempotent: a retried routing of the
        same request counts once, on the replica chosen last)."""
        for ids in self._placed.values():
            ids.discard(request_id)
        self._placed.setdefault(replica, set()).add(request_id)

    def forget_others(self, alive: Iterable[str]) -> None:
        keep = set(alive)
        for name in [n for n in self._placed if n not in keep]:
            del self._placed[name]
        for name in [n for n in self._report if n not in keep]:
            del self._report[name]
