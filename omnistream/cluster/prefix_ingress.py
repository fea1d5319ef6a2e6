"""In Serve's HTTP proxy: the prefix keys of a stateless chat completion, put into a header for
the router (prefix_keys.py says what a key is, prefix_affinity.py how the router uses it).

The router cannot read a request's body: Serve's proxy routes a request before its body is
read (the replica pulls the body from the proxy afterwards), and hands the router only the
ASGI scope (router.py). So PrefixKeyMiddleware, one of the proxy's middlewares (ingress.py),
reads the body of a `POST /v1/chat/completions` without X-Session-Id before the proxy sees
the request, computes the keys, and passes the proxy a copy of the scope with

    x-omnistream-prefix-keys: <key>,<key>,...      (placement.PREFIX_HEADER)

which the router reads from the scope, and the replica too (it reports the keys it served).
The body messages it read are replayed to the proxy first, unchanged and in order, then
`receive` is the client's again: the replica gets the body byte for byte.

Bounded: at most MAX_KEYED_BODY_BYTES are buffered; a larger body gets no key (it is routed
by load) and is relayed as it comes. Bodies over INLINE_BYTES are hashed in a worker thread,
so the proxy's event loop goes on relaying other requests meanwhile. A client's own header of
that name is dropped: the proxy alone writes it. Every other request passes untouched.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from omnistream.cluster.placement import PREFIX_HEADER, Kind, header_of, route_of_scope
from omnistream.cluster.prefix_keys import prefix_keys

log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
MAX_KEYED_BODY_BYTES = 32 << 20  # bodies up to this are buffered and keyed (data URLs can be megabytes)
INLINE_BYTES = 1 << 20  # bodies over this are keyed in a worker thread


class PrefixKeyMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int = MAX_KEYED_BODY_BYTES) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not _keyed(scope):
            return await self.app(_with_keys(scope, ()) if header_of(scope, PREFIX_HEADER) else scope, receive, send)
        read, body = await _read_body(receive, self.max_body_bytes)
        keys = await _keys_of(body, header_of(scope, b"authorization")) if body is not None else ()
        await self.app(_with_keys(scope, keys), _replaying(read, receive), send)


def _keyed(scope: Scope) -> bool:
    path = scope.get("path", "")[len(scope.get("root_path", "")):]
    return (scope.get("method") == "POST" and path.rstrip("/") == CHAT_PATH
            and route_of_scope(scope).kind is Kind.STATELESS)


async def _read_body(receive: Receive, limit: int) -> tuple[list[Message], bytes | None]:
    """(the messages read, the whole body or None): reads until the body ends, the client
    leaves, or more than `limit` bytes came."""
    read: list[Message] = []
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        read.append(msg)
        if msg["type"] != "http.request":  # http.disconnect
            return read, None
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            return read, None
        chunks.append(chunk)
        if not msg.get("more_body", False):
            return read, b"".join(chunks)


async def _keys_of(body: bytes, authorization: str | None) -> tuple[str, ...]:
    try:
        if len(body) > INLINE_BYTES:
            return await asyncio.to_thread(prefix_keys, body, authorization)
        return prefix_keys(body, authorization)
    except Exception:  # noqa: BLE001 - a routing hint must never fail the request
        log.warning("prefix keys of a chat completion failed; routed by load", exc_info=True)
        return ()


def _with_keys(scope: Scope, keys: tuple[str, ...]) -> Scope:
    """A copy of `scope` whose headers carry `keys` (and no other header of that name)."""
    headers = [(k, v) for k, v in scope.get("headers") or () if k.lower() != PREFIX_HEADER]
    if keys:
        headers.append((PREFIX_HEADER, ",".join(keys).encode()))
    return {**scope, "headers": headers}


def _replaying(read: list[Message], receive: Receive) -> Receive:
    pending = deque(read)

    async def replay() -> Message:
        return pending.popleft() if pending else await receive()

    return replay
