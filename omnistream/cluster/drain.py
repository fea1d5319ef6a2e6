"""Draining a replica: it takes no new sessions and no stateless requests, and serves its open
sessions (HTTP and live sockets) and the requests it is running until they end.

    POST   /v1/replicas/{name}/drain    start draining (API key, as every route)
    DELETE /v1/replicas/{name}/drain    take new work again

Any replica answers the route: it asks the named one (ops.Fanout, a call addressed to it) to
set its flag, which that replica then reports in its routing stats; the routers (router.py)
leave a draining replica out of placement for new sessions and stateless requests, while a
session's requests still go to the replica its id names. The route answers once the router of
its own process has seen the flag (routers learn it from the same broadcast of Serve's
controller), so new sessions opened after the answer go elsewhere.

A router whose figures are older than the flag can still send a new session to the draining
replica; DrainGuard refuses it there (503 `replica_draining` with Retry-After, or on a
WebSocket an `error` event and close 1013 "try again later"): a retried request lands
elsewhere. GET /v1/replicas shows the replica as `draining`, and `drained` once it holds no
session and runs no request (it can then be removed with nothing lost).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from omnistream.cluster import peers
from omnistream.cluster.placement import Kind, route_of_scope
from omnistream.server.auth import tenant_for
from omnistream.server.errors import APIError, NotFound

PROPAGATION_TIMEOUT_S = 10.0  # routing stats come every ROUTING_STATS_PERIOD_S; the controller broadcasts them
RETRY_AFTER_S = 1
TRY_AGAIN_LATER = 1013  # WebSocket close code


@dataclass
class DrainState:
    draining: bool = False
    since: float | None = None  # unix seconds

    def set(self, on: bool) -> None:
        if on != self.draining:
            self.draining, self.since = on, (time.time() if on else None)


def drain_status(draining: bool, sessions: int, requests: int) -> str:
    """A replica's status in GET /v1/replicas."""
    if not draining:
        return "running"
    return "drained" if sessions == 0 and requests == 0 else "draining"


class ReplicaDraining(APIError):
    status, type, code = 503, "server_error", "replica_draining"


def _draining_error(replica: str) -> ReplicaDraining:
    return ReplicaDraining(f"replica {replica!r} is draining and takes no new sessions; retry (another replica "
                           "takes it)")


class DrainGuard:
    """On a draining replica, refuses what opens a session (see the module docstring)."""

    def __init__(self, app: ASGIApp, replica: str, drain: DrainState) -> None:
        self.app, self.replica, self.drain = app, replica, drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (not self.drain.draining or scope["type"] not in ("http", "websocket")
                or route_of_scope(scope).kind is not Kind.OPEN):
            return await self.app(scope, receive, send)
        err = _draining_error(self.replica)
        if scope["type"] == "http":
            response = JSONResponse(err.body(), status_code=err.status, headers={"Retry-After": str(RETRY_AFTER_S)})
            return await response(scope, receive, send)
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": json.dumps({"type": "error", "error": {**err.body()["error"],
                                                                                           "event_id": None}})})
        await send({"type": "websocket.close", "code": TRY_AGAIN_LATER, "reason": err.code})


async def _set_draining(request: Request, on: bool) -> JSONResponse:
    from omnistream.cluster.ops import Fanout

    fanout: Fanout = request.app.state.omni.extras["fanout"]
    name = request.path_params["name"]
    if name not in await fanout.replicas():
        err = NotFound(f"no replica {name!r} (GET /v1/replicas lists them)", param="name", code="replica_not_found")
        return JSONResponse(err.body(), status_code=err.status)
    answer = await fanout.call(name, "set_draining", on, tenant_for(request))
    if answer is None:
        return JSONResponse({"error": {"message": f"replica {name!r} did not answer", "type": "server_error",
                                       "param": "name", "code": "replica_unavailable"}}, status_code=503)
    await _routers_know(fanout.app_name, name, on)
    return JSONResponse(answer)


async def _routers_know(app_name: str, name: str, on: bool) -> None:
    """Waits until this process's router has the replica's new flag (see the module docstring)."""
    deadline = time.monotonic() + PROPAGATION_TIMEOUT_S
    while (name in peers.draining(app_name)) != on and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def start_draining(request: Request) -> JSONResponse:
    return await _set_draining(request, True)


async def stop_draining(request: Request) -> JSONResponse:
    return await _set_draining(request, False)


def install(app: FastAPI, replica: str, drain: DrainState) -> None:
    app.add_api_route("/v1/replicas/{name}/drain", start_draining, methods=["POST"])
    app.add_api_route("/v1/replicas/{name}/drain", stop_draining, methods=["DELETE"])
    # innermost (after the API key check): an unauthenticated caller learns nothing of the replica
    app.user_middleware.append(Middleware(DrainGuard, replica=replica, drain=drain))
