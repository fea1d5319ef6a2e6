"""SessionAffinityRouter: omnistream's request router on Ray Serve's router interface
(`ray.serve.request_router.RequestRouter`, set on the replica deployment by deploy.py).

Ray Serve calls `choose_replicas` with the running replicas and the pending request, and sends
the request to the first replica of the first rank that has room (`max_ongoing_requests`),
retrying with backoff while none has. We answer (placement.py says what each route means):

    SESSION / TARGET  [[its replica]]: hard affinity, never another replica while it runs
                      (a full replica makes the request wait, not move); if the replica is
                      gone, any replica (it answers 410 session_lost, lost.py)
    OPEN              one rank per replica, least loaded by sessions and KV first
    STATELESS         one rank with every replica: Serve picks the one with the fewest
                      requests in flight (its own, always fresh, count)

OPEN and STATELESS leave out the replicas that report draining (drain.py), unless all do.

Loads come from the replicas' routing stats (`EngineReplica.record_routing_stats`, every
`request_routing_stats_period_s`) plus the sessions this router placed since. The router
subclasses the base RequestRouter and none of its mixins: the base fulfils exactly the request
it chose replicas for (the FIFO mixin would hand a chosen replica to the oldest waiting
request, whatever its session).

For a request from Serve's HTTP proxy the router reads the path and headers from the ASGI scope
the proxy sends as the request's argument (Ray 2.60: a pickled StreamingHTTPRequest), since
RequestMetadata carries only the matched route pattern (`/v1/sessions/{session_id}`), not the
id. Internal handle calls carry their key in `RequestMetadata.session_id`.

Serve pickles this module by value into each routing process: it keeps no state of its own
(peers.py holds what other code of the process reads).
"""

from __future__ import annotations

import pickle
from typing import Any, Mapping

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from omnistream.cluster import peers  # a module: pickled by name (see peers.py)
from omnistream.cluster.placement import (
    Kind,
    PlacementLedger,
    ReplicaLoad,
    Route,
    rank_for_sessions,
    route_of_key,
    route_of_scope,
)

def replica_name(replica: RunningReplica) -> str:
    return replica.replica_id.unique_id


class SessionAffinityRouter(RequestRouter):
    def initialize_state(self, **kwargs: Any) -> None:
        self._ledger = PlacementLedger()

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        names = tuple(sorted(replica_name(r) for r in replicas))
        self._ledger.forget_others(names)
        peers.publish(self.app_name, names, frozenset(replica_name(r) for r in replicas if _draining(r)))

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is None:  # the base loop asks without a request: anything
            return [candidate_replicas]
        route = route_of_request(pending_request)
        by_name = {replica_name(r): r for r in candidate_replicas}
        if route.kind in (Kind.SESSION, Kind.TARGET) and route.replica is not None:
            home = by_name.get(route.replica)
            if home is not None:
                # wait (with backoff) for this replica rather than moving to another
                pending_request.routing_context.should_backoff = True
                return [[home]]
            # its replica is gone: whichever replica gets it says so (410)
        if route.kind is not Kind.TARGET:  # new work: not to a draining replica
            candidate_replicas = [r for r in candidate_replicas if not _draining(r)] or candidate_replicas
        if route.kind is Kind.OPEN:
            ranked = rank_for_sessions(self._load(r) for r in candidate_replicas)
            self._ledger.record(ranked[0], pending_request.metadata.internal_request_id)
            return [[by_name[name]] for name in ranked]
        return [candidate_replicas]

    def _load(self, replica: RunningReplica) -> ReplicaLoad:
        name, stats = replica_name(replica), replica.routing_stats or {}
        self._ledger.observe_report(name, stats.get("report"))
        return ReplicaLoad.from_stats(name, stats, self._ledger.placed(name))


def _draining(replica: RunningReplica) -> bool:
    return bool((replica.routing_stats or {}).get("draining"))


def route_of_request(pending_request: PendingRequest) -> Route:
    scope = _asgi_scope(pending_request.args)
    if scope is not None:
        return route_of_scope(scope)
    return route_of_key(pending_request.metadata.session_id)


def _asgi_scope(args: list[Any]) -> Mapping[str, Any] | None:
    """The ASGI scope of a request from Serve's HTTP proxy (its only argument: the pickled
    request, as the proxy sends it), or None for a handle call."""
    if len(args) != 1 or not isinstance(args[0], bytes):
        return None
    try:
        request = pickle.loads(args[0])  # from our own proxy, through Ray's object store
    except Exception:  # noqa: BLE001 - not a proxied request: route it as a handle call
        return None
    scope = getattr(request, "asgi_scope", None)
    return scope if isinstance(scope, Mapping) else None
