"""What a replica reports: the routing stats the router balances with (every
`request_routing_stats_period_s`, through Serve's controller) and its entry in
GET /v1/replicas. Both are read from the server state of the replica's app: the engine's
stats (one round trip through the engine loop: call it in a worker thread) and the session
registry."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

from omnistream.cluster.drain import DrainState, drain_status
from omnistream.server.state import ServerState

_REPORTS = itertools.count(1)


@dataclass(frozen=True)
class SessionInfo:
    id: str
    kind: str  # "session" (pinned, HTTP) or "live" (a /v1/realtime socket)
    created: int  # unix seconds
    requests: int  # requests of this session this replica served


@dataclass(frozen=True)
class ReplicaReport:
    replica: str
    model: str
    open_sessions: int  # pinned sessions (HTTP)
    live_sessions: int  # /v1/realtime sockets
    max_sessions: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_retained: int  # held for idle sessions
    requests_running: int
    requests_waiting: int  # the engine's queue
    sessions: list[SessionInfo] = field(default_factory=list)  # the caller's own (ids are per tenant)
    status: str = "running"  # "draining", "drained" (drain.drain_status)
    draining_since: int | None = None  # unix seconds

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def engine_snapshot(state: ServerState) -> dict[str, Any]:
    """Engine.stats() (blocks until the engine loop answers, between two steps)."""
    return state.engine.stats()


def routing_stats(state: ServerState, snapshot: dict[str, Any], drain: DrainState, prefixes: bytes) -> dict[str, Any]:
    """The router's view (placement.ReplicaLoad.from_stats and prefix_affinity.PrefixLedger
    read it); `report` changes on every report, so a router knows which of its placements the
    figures already include; `prefixes`: the packed keys of the prefixes served lately."""
    counts = _counts(state)
    return {
        "report": next(_REPORTS),
        "sessions": counts["session"] + counts["live"],
        "max_sessions": state.config.max_sessions,
        "kv_used": snapshot["kv_blocks_total"] - snapshot["kv_blocks_free"],
        "kv_total": snapshot["kv_blocks_total"],
        "queued": snapshot["requests_running"] + snapshot["requests_waiting"],
        "draining": drain.draining,  # the routers place nothing new here
        "prefixes": prefixes,  # prefix_affinity.RecentPrefixes.packed()
    }


def replica_report(state: ServerState, replica: str, snapshot: dict[str, Any], tenant: str | None,
                   served: dict[str, int], drain: DrainState) -> ReplicaReport:
    """This replica's entry in GET /v1/replicas; only `tenant`'s sessions are listed (another
    tenant's ids stay unknown to the caller, as everywhere else), all are counted."""
    counts = _counts(state)
    registry = state.extras.get("sessions")
    entries = registry.entries() if registry is not None else []
    mine = [SessionInfo(e.id, e.kind, int(e.created), served.get(e.id, 0)) for e in entries if e.tenant == tenant]
    return ReplicaReport(
        replica=replica, model=state.model_name, open_sessions=counts["session"], live_sessions=counts["live"],
        max_sessions=state.config.max_sessions, kv_blocks_total=snapshot["kv_blocks_total"],
        kv_blocks_used=snapshot["kv_blocks_total"] - snapshot["kv_blocks_free"],
        kv_blocks_retained=snapshot["kv_blocks_retained"], requests_running=snapshot["requests_running"],
        requests_waiting=snapshot["requests_waiting"], sessions=sorted(mine, key=lambda s: s.created),
        status=drain_status(drain.draining, counts["session"] + counts["live"],
                            snapshot["requests_running"] + snapshot["requests_waiting"]),
        draining_since=int(drain.since) if drain.since is not None else None)


def _counts(state: ServerState) -> dict[str, int]:
    registry = state.extras.get("sessions")
    return registry.counts() if registry is not None else {"session": 0, "live": 0}
