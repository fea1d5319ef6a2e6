"""Every response of a replica names it (`x-omnistream-replica`, on HTTP responses and on the
WebSocket handshake), and the replica counts the requests it served per session, so a client,
a test or an operator can see that a session's requests all landed on its replica
(GET /v1/replicas lists the counts)."""

from __future__ import annotations

import threading

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from omnistream.cluster.placement import REPLICA_HEADER, Kind, route_of_scope


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


def session_of(scope: Scope) -> str | None:
    route = route_of_scope(scope)
    return route.session_id if route.kind is Kind.SESSION else None


class ServedByMiddleware:
    def __init__(self, app: ASGIApp, replica: str, served: ServedRequests) -> None:
        self.app, self.header, self.served = app, (REPLICA_HEADER.encode(), replica.encode()), served

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        sid = session_of(scope)
        if sid is not None:
            self.served.add(sid)

        async def send_named(msg: Message) -> None:
            if msg["type"] in ("http.response.start", "websocket.accept", "websocket.http.response.start"):
                msg = {**msg, "headers": [*msg.get("headers", []), self.header]}
            await send(msg)

        await self.app(scope, receive, send_named)
