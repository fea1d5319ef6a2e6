"""API keys and tenants.

With `ServerConfig.api_key` (and / or `api_keys_file`, one key per line) set, every HTTP
request and WebSocket except the public paths
(/health, and whatever a module adds with `allow_anonymous`) must present the key:

    HTTP        Authorization: Bearer <key>
    WebSocket   Authorization: Bearer <key>, or (browsers cannot set headers on a WebSocket)
                the `api_key` query parameter, or the subprotocol `openai-insecure-api-key.<key>`
                (what OpenAI's browser clients send)

Keys are compared in constant time. The key also names the tenant: `tenant_for(conn)` is a
salt derived from it (sha256), passed as the cache salt of every request, so clients of two keys
never share prefix-cache KV or re-sent media, and see only their own sessions. Without a key the server is open and has one
tenant (None).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from urllib.parse import parse_qs

from fastapi import FastAPI
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

PUBLIC_PATHS = ("/health",)
SUBPROTOCOL_PREFIX = "openai-insecure-api-key."


def tenant_salt(key: str) -> str:
    """The cache salt of a key: stable across restarts, reveals nothing about the key."""
    return "tenant-" + hashlib.sha256(key.encode()).hexdigest()[:32]


def tenant_for(conn: HTTPConnection) -> str | None:
    """The tenant of an authenticated request or WebSocket (None on an open server)."""
    return conn.scope.get("state", {}).get("tenant")


def allow_anonymous(app: FastAPI, path: str) -> None:
    """Lets `path` (exact) through without a key, e.g. a static page that asks for the key."""
    app.state.omni.extras.setdefault("public_paths", set()).add(path)


def accepted_subprotocol(conn: HTTPConnection, preferred: str = "realtime") -> str | None:
    """The subprotocol a WebSocket route should accept: browsers close a socket whose reply
    names none of the offered ones, and the key-carrying one must never be echoed back."""
    offered = conn.scope.get("subprotocols") or []
    if preferred in offered:
        return preferred
    return next((p for p in offered if not p.startswith(SUBPROTOCOL_PREFIX)), None)


def _bearer(headers: dict[bytes, bytes]) -> str | None:
    value = headers.get(b"authorization", b"").decode("latin-1").strip()
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def presented_key(scope: Scope) -> str | None:
    """The key a connection presents (header first; query and subprotocol for WebSockets)."""
    headers = dict(scope.get("headers") or [])
    key = _bearer(headers)
    if key is not None or scope["type"] != "websocket":
        return key
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if query.get("api_key"):
        return query["api_key"][0]
    for proto in scope.get("subprotocols") or []:
        if proto.startswith(SUBPROTOCOL_PREFIX):
            return proto[len(SUBPROTOCOL_PREFIX):]
    return None


def key_matches(presented: str | None, keys: list[str]) -> str | None:
    """The configured key equal to `presented` (constant time per key, every key compared)."""
    found = None
    given = (presented or "").encode()
    for k in keys:
        if hmac.compare_digest(given, k.encode()) and presented is not None:
            found = k
    return found


class AuthMiddleware:
    """Pure ASGI (no buffering: streams and WebSockets pass through untouched)."""

    def __init__(self, app: ASGIApp, keys: list[str], public: set[str]) -> None:
        self.app, self.keys, self.public = app, keys, public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self.keys:
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        key = key_matches(presented_key(scope), self.keys)
        if key is not None:
            state["tenant"] = tenant_salt(key)
        elif scope["path"] not in self.public:
            missing = presented_key(scope) is None
            message = ("missing API key: send 'Authorization: Bearer <key>'" if missing
                       else "invalid API key")
            return await _deny(scope, receive, send, message)
        await self.app(scope, receive, send)


async def _deny(scope: Scope, receive: Receive, send: Send, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": "invalid_api_key"}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"www-authenticate", b"Bearer")]
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    await receive()  # websocket.connect
    if "websocket.http.response" in scope.get("extensions", {}):  # a real 401 before the upgrade
        await send({"type": "websocket.http.response.start", "status": 401, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": message})


def install(app: FastAPI) -> None:
    state = app.state.omni
    public = state.extras.setdefault("public_paths", set())
    public.update(PUBLIC_PATHS)
    # the set is shared: paths added by modules installed later are honoured too
    app.add_middleware(AuthMiddleware, keys=state.config.api_keys(), public=public)
