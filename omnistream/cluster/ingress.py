"""In Serve's HTTP proxy (the ingress): omnistream's middlewares of every proxy process.

    LostSocketMiddleware   a live socket whose replica died gets an `error` event naming its
                           session as lost, then close 1011 `session_lost`, not a bare close
    PrefixKeyMiddleware    a stateless chat completion gets the prefix keys of its prompt, for
                           the router's prefix affinity (prefix_ingress.py)

A /v1/realtime socket is proxied message by message: the client's socket ends at Serve's proxy,
which relays to the replica that holds the live session. When that replica dies, the proxy's
relay to it fails (Ray 2.60: ProxyResponseGenerator raises the actor's death, and the proxy
returns without a close message: uvicorn then drops the socket with no reason). Nothing of the
replica runs any more, so the only place that can still tell the client is the proxy itself.
Serve runs the Starlette middlewares that the function at RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH
returns around its ASGI app (in every proxy process); `proxy_middlewares` is that function.
(The proxy is also the only place that sees a request's body before it is routed: hence the
prefix keys, prefix_ingress.py.)

LostSocketMiddleware watches each /v1/realtime socket: the replica that accepted it (the
`x-omnistream-replica` header of the handshake) and the session id in its `session.created`
event. When the relay ends after the accept with no close from the replica and no disconnect
from the client, the replica is gone, and the middleware sends

    {"type": "error", "error": {"type": "invalid_request_error", "code": "session_lost",
     "param": "session_id", "message": "session 's-...' is lost: replica '...', which held it,
     is gone ...", "event_id": null}}

(the body of the HTTP 410, lost.py) and closes with 1011 and reason `session_lost`.

The variable must be in the environment of the Ray processes that run the proxies (without
it, live sockets just close and stateless requests are balanced by load only):
local.start_local_ray sets it for a cluster of this machine; on a cluster started with
`ray start`, set it there (docs/cluster.md).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from omnistream.cluster.placement import REPLICA_HEADER, Kind, route_of_scope
from omnistream.cluster.prefix_ingress import PrefixKeyMiddleware

log = logging.getLogger(__name__)

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "omnistream.cluster.ingress:proxy_middlewares"
INTERNAL_ERROR = 1011  # WebSocket close code: the server met a condition that ends the connection
LOST_REASON = "session_lost"


def proxy_middlewares() -> list[Middleware]:
    """Serve's HTTP proxy callback (CALLBACK_ENV): the middlewares of every proxy."""
    return [Middleware(LostSocketMiddleware), Middleware(PrefixKeyMiddleware)]


@dataclass
class SocketWatch:
    """What the proxy relayed of one live socket."""

    replica: str | None = None
    session_id: str | None = None
    accepted: bool = False
    closed: bool = False  # the replica sent its close
    client_gone: bool = False

    def saw_sent(self, msg: Message) -> None:
        kind = msg["type"]
        if kind == "websocket.accept":
            self.accepted = True
            for key, value in msg.get("headers") or ():
                if key.decode("latin-1").lower() == REPLICA_HEADER:
                    self.replica = value.decode("latin-1")
        elif kind == "websocket.close":
            self.closed = True
        elif kind == "websocket.send" and self.session_id is None:
            self.session_id = _created_session(msg.get("text"))

    def saw_received(self, msg: Message) -> None:
        if msg["type"] == "websocket.disconnect":
            self.client_gone = True

    @property
    def replica_died(self) -> bool:
        return self.accepted and not self.closed and not self.client_gone


def _created_session(text: str | None) -> str | None:
    """The session id of a `session.created` event (the socket's first event), else None."""
    if not text or "session.created" not in text[:64]:
        return None
    try:
        event = json.loads(text)
    except ValueError:
        return None
    return (event.get("session") or {}).get("id") if event.get("type") == "session.created" else None


def lost_event(watch: SocketWatch) -> dict:
    from omnistream.cluster.lost import lost_error

    if watch.session_id is not None and watch.replica is not None:
        error = lost_error(watch.session_id, watch.replica).body()["error"]
    else:  # died before it named its session
        error = {"type": "invalid_request_error", "code": LOST_REASON, "param": None,
                 "message": f"the replica {watch.replica or '?'} serving this socket is gone; open a new one"}
    return {"type": "error", "error": {**error, "event_id": None}}


class LostSocketMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket" or route_of_scope(scope).kind is not Kind.OPEN:
            return await self.app(scope, receive, send)
        watch = SocketWatch()

        async def watched_receive() -> Message:
            msg = await receive()
            watch.saw_received(msg)
            return msg

        async def watched_send(msg: Message) -> None:
            watch.saw_sent(msg)
            await send(msg)

        try:
            await self.app(scope, watched_receive, watched_send)
        except Exception:  # noqa: BLE001 - the relay's failure is what this reports; re-raised if it cannot
            if not watch.replica_died:
                raise
            log.warning("live socket of session %s: replica %s gone", watch.session_id, watch.replica, exc_info=True)
        if watch.replica_died:
            await self._tell_lost(send, watch)

    @staticmethod
    async def _tell_lost(send: Send, watch: SocketWatch) -> None:
        try:
            await send({"type": "websocket.send", "text": json.dumps(lost_event(watch))})
            await send({"type": "websocket.close", "code": INTERNAL_ERROR, "reason": LOST_REASON})
        except Exception:  # noqa: BLE001 - the client went away meanwhile: nothing to tell
            pass
