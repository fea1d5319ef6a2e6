"""Every response of a replica names it (`x-omnistream-replica`, on HTTP responses and on the
WebSocket handshake), and the replica counts the requests it served per session, so a client,
a test or an operator can see that a session's requests all landed on its replica
(GET /v1/replicas lists the counts). It also notes the prefix keys of the stateless requests
it takes (prefix_affinity.RecentPrefixes), which its routing stats report to the routers."""

from __future__ import annotations

import threading

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from omnistream.cluster.placement import REPLICA_HEADER, Kind, route_of_scope
from omnistream.cluster.prefix_affinity import RecentPrefixes


class ServedRequests:
    """session id -> requests this replica served for it (pruned to the open sessions)."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, session_id: str) -> None:
        with self._lock:
            self._counts[session_id] = self._counts.get(session_id, 0) + 1

    def snapshot(self, open_ids: set[str]) -> dict[str, int]:
        """The counts of the sessions still open; the others are forgotten."""
        with self._lock:
            self._counts = {k: v for k, v in self._counts.items() if k in open_ids}
            return dict(self._counts)


class ServedByMiddleware:
    def __init__(self, app: ASGIApp, replica: str, served: ServedRequests, prefixes: RecentPrefixes) -> None:
        self.app, self.header, self.served = app, (REPLICA_HEADER.encode(), replica.encode()), served
        self.prefixes = prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        route = route_of_scope(scope)
        if route.kind is Kind.SESSION and route.session_id is not None:
            self.served.add(route.session_id)
        elif route.prefix_keys:  # noted as it arrives: a router placing the same prefix next sees it in the next report
            self.prefixes.add(route.prefix_keys)

        async def send_named(msg: Message) -> None:
            if msg["type"] in ("http.response.start", "websocket.accept", "websocket.http.response.start"):
                msg = {**msg, "headers": [*msg.get("headers", []), self.header]}
            await send(msg)

        await self.app(scope, receive, send_named)
