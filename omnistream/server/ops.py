"""Operations: GET /health (no key), GET /v1/models, GET /metrics, the request id and access
log, and the request-body limit.

Every HTTP request and WebSocket gets an id (the client's `x-request-id` when it is a sane
token, else a new one), echoed in the `x-request-id` response header and written in one
access-log line when the response ends (logger `omnistream.server.access`):

    <id> <method> <path> <status> <ms> ms

(499: the client left before the answer.) Bodies over `max_body_bytes` get 413, whether the
client declared their length or streams them chunked.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from omnistream.server.metrics import ServerMetrics
from omnistream.server.openai_protocol import ModelCard, ModelList
from omnistream.server.state import ServerState, get_state

access_log = logging.getLogger("omnistream.server.access")
HEALTH_TIMEOUT_S = 5.0  # the engine loop must answer within this (it runs between steps)
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


async def health(request: Request) -> JSONResponse:
    state = get_state(request)
    try:  # a round trip through the engine loop: alive and not stuck
        await asyncio.to_thread(state.engine.core.run_op, "noop", timeout=HEALTH_TIMEOUT_S)
        alive = True
    except Exception:  # noqa: BLE001 - closed (EngineError) or stuck (TimeoutError)
        alive = False
    body = {"status": "ok" if alive else "unavailable", "model": state.model_name, "engine_alive": alive}
    return JSONResponse(body, status_code=200 if alive else 503)


async def list_models(request: Request) -> JSONResponse:
    state = get_state(request)
    models = ModelList(data=[ModelCard(id=state.model_name, created=int(state.started_at))])
    return JSONResponse(models.model_dump(mode="json"))


async def metrics(request: Request) -> Response:
    registry: ServerMetrics = get_state(request).extras["metrics"]
    return Response(await asyncio.to_thread(registry.render), media_type=CONTENT_TYPE_LATEST)


class RequestLogMiddleware:
    """Request id, `x-request-id` header, one access-log line and the status counter."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _SANE_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status, t0 = None, time.perf_counter()

        async def send_with_id(msg: Message) -> None:
            nonlocal status
            if msg["type"] in ("http.response.start", "websocket.http.response.start"):
                status = msg["status"]
                msg["headers"] = [*msg.get("headers", []), (b"x-request-id", rid.encode())]
            elif msg["type"] == "websocket.accept":
                status = 101
            await send(msg)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:  # shutdown, or the client's connection is gone
            raise
        except BaseException:
            status = status or 500
            raise
        finally:
            status = status or 499  # ended without a response: the client went away
            if scope.get("state", {}).get("stream_cut"):
                status = 499  # a stream cut off after its 200 was sent
            access_log.info("%s %s %s %s %.1f ms", rid, scope.get("method", "WS"), scope["path"], status,
                            (time.perf_counter() - t0) * 1000)
            self.metrics.observe_http(status)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse({"error": {"message": self._message(int(declared)), "type": "invalid_request_error",
                                               "param": None, "code": "payload_too_large"}}, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:  # an HTTPException: FastAPI's body reader passes it on
                    raise HTTPException(413, self._message(seen))
            return msg

        await self.app(scope, counted, send)

    def _message(self, size: int) -> str:
        return f"request body too large: {size} bytes or more, the limit is {self.max_bytes}"


def install_body_limit(app: FastAPI) -> None:
    """Before auth is installed, so inside it: a request without a valid key is refused (401)
    before its body is read or measured."""
    app.add_middleware(BodyLimitMiddleware, max_bytes=app.state.omni.config.max_body_bytes)


def install(app: FastAPI) -> None:
    state: ServerState = app.state.omni
    registry = state.extras["metrics"] = ServerMetrics(state)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_middleware(RequestLogMiddleware, metrics=registry)  # outermost: sees every answer
