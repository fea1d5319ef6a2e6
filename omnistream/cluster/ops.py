"""The cluster's operations routes, served by whichever replica gets the request:

    GET /v1/replicas   each replica's sessions (the caller's own), KV use and queue
    GET /metrics       every replica's metrics, labelled replica="<name>" (metrics_merge.py)
    POST|DELETE /v1/replicas/{name}/drain   (drain.py)

The replica asks every replica (itself included) through a handle to its own deployment, one
call addressed to each (`replica:<name>` keys: the router sends it there and nowhere else). The
list of replicas is the one Serve gives the router of this process (peers.py). A
replica that does not answer within CALL_TIMEOUT_S is listed as unavailable; the routes never
fail because one replica is slow or gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST

from omnistream.cluster import peers
from omnistream.cluster.metrics_merge import merge_metrics
from omnistream.cluster.placement import target_key
from omnistream.server.auth import tenant_for

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 5.0
DISCOVERY_TIMEOUT_S = 5.0


class Fanout:
    """Calls one method on every replica of the deployment (`method(expect=<name>, ...)`: a
    replica answers None when it is not `expect`, which only happens if `expect` is gone)."""

    def __init__(self, app_name: str, deployment: str) -> None:
        self.app_name, self.deployment = app_name, deployment
        self._handle = None

    def handle(self):
        if self._handle is None:
            from ray import serve

            self._handle = serve.get_deployment_handle(self.deployment, app_name=self.app_name)
        return self._handle

    async def replicas(self) -> tuple[str, ...]:
        names = peers.known(self.app_name)
        if names:
            return names
        # this process's router learns the replicas with its first request: send one
        await self.handle().options(method_name="replica_name").remote()
        deadline = time.monotonic() + DISCOVERY_TIMEOUT_S
        while not (names := peers.known(self.app_name)) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return names

    async def call_all(self, method: str, *args: Any) -> dict[str, Any]:
        """replica name -> its answer, or None when it did not answer. One call at a time:
        calls made while serving one request share its internal request id, and Serve's router
        hands a replica to the pending request *of that id* it indexed first, so concurrent
        calls to different replicas would take each other's replica (Ray 2.60)."""
        return {name: await self.call(name, method, *args) for name in await self.replicas()}

    async def call(self, name: str, method: str, *args: Any) -> Any:
        """`name`'s answer, or None. A call that reached another replica (it answers None: not
        the one expected) is made again, within CALL_TIMEOUT_S in all."""
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while True:
            call = self.handle().options(method_name=method, session_id=target_key(name)).remote(name, *args)
            try:
                answer = await asyncio.wait_for(_awaited(call), max(0.05, deadline - time.monotonic()))
            except Exception as e:  # noqa: BLE001 - a dead or stuck replica is reported, not raised
                log.warning("replica %s did not answer %s: %r", name, method, e)
                return None
            if answer is not None or time.monotonic() >= deadline:
                if answer is None:
                    log.warning("replica %s: every %s call reached another replica", name, method)
                return answer
            await asyncio.sleep(0.05)


async def _awaited(response):
    return await response


async def list_replicas(request: Request) -> JSONResponse:
    fanout: Fanout = request.app.state.omni.extras["fanout"]
    answers = await fanout.call_all("report", tenant_for(request))
    data = [a if a is not None else {"replica": name, "status": "unavailable"} for name, a in sorted(answers.items())]
    return JSONResponse({"object": "list", "data": data})


async def cluster_metrics(request: Request) -> Response:
    fanout: Fanout = request.app.state.omni.extras["fanout"]
    answers = await fanout.call_all("metrics_text")
    texts = {name: text for name, text in answers.items() if text is not None}
    body = await asyncio.to_thread(merge_metrics, texts, len(answers) - len(texts))
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def install(app: FastAPI, fanout: Fanout) -> None:
    """Adds the routes ahead of the app's own: this /metrics replaces the single server's (which
    the replica still serves to the fan-out, ServerMetrics.render)."""
    app.state.omni.extras["fanout"] = fanout
    app.add_api_route("/v1/replicas", list_replicas, methods=["GET"])
    app.add_api_route("/metrics", cluster_metrics, methods=["GET"])
    ours = [r for r in app.router.routes if isinstance(r, APIRoute) and r.endpoint in (list_replicas, cluster_metrics)]
    app.router.routes[:] = ours + [r for r in app.router.routes if r not in ours]
