"""SessionAffinityRouter: omnistream's request router on Ray Serve's router interface
(`ray.serve.request_router.RequestRouter`, set on the replica deployment by deploy.py).

Ray Serve calls `choose_replicas` with the running replicas and the pending request, and sends
the request to the first replica of the first rank that has room (`max_ongoing_requests`),
retrying with backoff while none has. We answer (placement.py says what each route means):

    SESSION / TARGET  [[its replica]]: hard affinity, never another replica while it runs
                      (a full replica makes the request wait, not move); if the replica is
                      gone, any replica (it answers 410 session_lost, lost.py)
    OPEN              one rank per replica, least loaded by sessions and KV first
    STATELESS with    one rank per replica (prefix_affinity.rank_stateless): the replicas that
      prefix keys     served the deepest of its prompt's prefixes lately first, unless busier
                      than max(least + 4, 2 x least) requests in flight (least: the least
                      busy replica's); then the others, least busy first; ties by rendezvous
                      hash of the prefix (every router breaks them alike)
    STATELESS         one rank with every replica: Serve picks the one with the fewest
      (no keys)       requests in flight by its queue-length cache (but see the
                      prefix_affinity docstring on proxied HTTP requests in Ray 2.60)

OPEN and STATELESS leave out the replicas that report draining (drain.py), unless all do. A
ranking of every replica backs off (Serve's backoff) once all of them were full.

Loads come from the replicas' routing stats (`EngineReplica.record_routing_stats`, every
`request_routing_stats_period_s`) plus the sessions this router placed since; the prefixes a
replica holds from the keys it reports plus those this router placed there since (kept until
two newer reports: prefix_affinity.PrefixLedger). For a request with prefix keys, each
replica is asked its requests in flight (`RunningReplica.get_queue_len`, all at once, at most
PROBE_DEADLINE_S: one round trip added to the routing of a chat completion); one that does not
answer counts its reported engine queue (the prefix_affinity docstring says why not Serve's
queue-length cache). Prefix keys are computed in Serve's proxy, the only process that sees the
body before routing (prefix_ingress.py), and read from a header of the scope. The router
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

import asyncio
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
from omnistream.cluster.prefix_affinity import PrefixLedger, StatelessCandidate, rank_stateless, stateless_load

PROBE_DEADLINE_S = 0.1  # Serve's own deadline for asking a replica its queue length


def replica_name(replica: RunningReplica) -> str:
    return replica.replica_id.unique_id


class SessionAffinityRouter(RequestRouter):
    def initialize_state(self, **kwargs: Any) -> None:
        self._ledger = PlacementLedger()
        self._prefixes = PrefixLedger()

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        names = tuple(sorted(replica_name(r) for r in replicas))
        self._ledger.forget_others(names)
        self._prefixes.forget_others(names)
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
        elif route.kind is Kind.STATELESS and route.prefix_keys and len(candidate_replicas) == 1:
            # no choice to make: no round trip to ask the replica its load (it is on the TTFT path)
            self._prefixes.record(replica_name(candidate_replicas[0]), route.prefix_keys)
            return [candidate_replicas]
        elif route.kind is Kind.STATELESS and route.prefix_keys:
            keys = route.prefix_keys
            in_flight = await asyncio.gather(*(_in_flight(r) for r in candidate_replicas))
            ranked = rank_stateless(keys, (self._candidate(r, n, keys) for r, n in zip(candidate_replicas, in_flight)))
            self._prefixes.record(ranked[0], keys)
        else:
            return [candidate_replicas]
        pending_request.routing_context.should_backoff = True  # every replica is ranked: back off once all were full
        return [[by_name[name]] for name in ranked]

    def _load(self, replica: RunningReplica) -> ReplicaLoad:
        name, stats = replica_name(replica), replica.routing_stats or {}
        self._ledger.observe_report(name, stats.get("report"))
        return ReplicaLoad.from_stats(name, stats, self._ledger.placed(name))

    def _candidate(self, replica: RunningReplica, in_flight: int | None, keys: tuple[str, ...]) -> StatelessCandidate:
        name, stats = replica_name(replica), replica.routing_stats or {}
        self._prefixes.observe_report(name, stats)
        return StatelessCandidate(name, stateless_load(in_flight, stats), self._prefixes.depth(name, keys))


async def _in_flight(replica: RunningReplica) -> int | None:
    """The replica's requests in flight, as it counts them; None if it does not answer in time."""
    try:
        return await asyncio.wait_for(replica.get_queue_len(deadline_s=PROBE_DEADLINE_S), PROBE_DEADLINE_S)
    except Exception:  # noqa: BLE001 - a slow or dead replica: its last report stands in
        return None


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
