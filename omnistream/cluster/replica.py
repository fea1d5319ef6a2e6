"""EngineReplica: one engine and the whole single-process server (server/app.py build_app) as
a Ray Serve replica. Serve's HTTP proxy hands it requests and WebSockets as ASGI, so every
route, stream and socket behaves exactly as on `omnistream serve` without --replicas; this
class only adds what a replica of a cluster needs:

    its name in its session ids (engine.session_id_prefix: placement.py routes by it)
    410 session_lost for a session whose replica is gone (lost.py)
    draining: no new sessions or stateless requests, open sessions served on (drain.py)
    x-omnistream-replica on every response, requests counted per session, prefix keys of
    the stateless requests it served noted (served.py, prefix_affinity.py)
    GET /v1/replicas and the cluster-wide /metrics (ops.py), answered with the methods below
    record_routing_stats (the router's load figures) and check_health (Serve restarts a
    replica whose engine loop does not answer)

deploy.py turns the class into a deployment with the resources and router of a ClusterSpec.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from types import SimpleNamespace
from typing import Any

from ray import serve

from omnistream.cluster import drain, lost, ops
from omnistream.cluster.placement import session_id_prefix
from omnistream.cluster.prefix_affinity import RecentPrefixes
from omnistream.cluster.report import engine_snapshot, replica_report, routing_stats
from omnistream.cluster.served import ServedByMiddleware, ServedRequests
from omnistream.cluster.spec import GPU_MEMORY_SHARE, ClusterSpec, ReplicaSpec

log = logging.getLogger(__name__)
HEALTH_TIMEOUT_S = 5.0  # the engine loop must answer within this (it answers between steps)


@serve.ingress()
class EngineReplica:
    def __init__(self, spec: ReplicaSpec, cluster: ClusterSpec) -> None:
        from omnistream.server.app import build_app

        context = serve.get_replica_context()
        self.name = context.replica_id.unique_id
        self.engine = build_replica_engine(spec, cluster)
        self.engine.session_id_prefix = session_id_prefix(self.name)
        config = dataclasses.replace(spec.server, served_model_name=spec.served_model_name)
        self.server_app = build_app(self.engine, config, default_sampling=spec.default_sampling)
        self.state = self.server_app.state.omni
        self.state.default_max_tokens = spec.default_max_tokens
        self.served = ServedRequests()
        self.prefixes = RecentPrefixes()
        self.drain = drain.DrainState()
        lost.install(self.server_app, self.name)
        ops.install(self.server_app, ops.Fanout(context.app_name, context.deployment))
        drain.install(self.server_app, self.name, self.drain)
        self.server_app.add_middleware(ServedByMiddleware, replica=self.name, served=self.served,
                                       prefixes=self.prefixes)
        log.info("replica %s: %s on %s", self.name, self.state.model_name, self.engine.cfg.device)

    def __serve_build_asgi_app__(self):  # Serve's wrapper keeps it as `self.app` (a property)
        return self.server_app

    # ------------------------------------------------------------------ Serve's calls
    async def record_routing_stats(self) -> dict[str, Any]:
        snapshot = await asyncio.to_thread(engine_snapshot, self.state)
        return routing_stats(self.state, snapshot, self.drain, self.prefixes.packed())

    async def check_health(self) -> None:
        """Raises (Serve then replaces the replica) when the engine loop is closed or stuck."""
        await asyncio.to_thread(self.engine.core.run_op, "noop", timeout=HEALTH_TIMEOUT_S)

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

    # ------------------------------------------------------------------ calls of the cluster's routes (ops.py)
    def replica_name(self) -> str:
        return self.name

    async def report(self, expect: str, tenant: str | None) -> dict[str, Any] | None:
        """This replica's GET /v1/replicas entry; None if it is not `expect` (see ops.Fanout)."""
        if expect != self.name:
            return None
        snapshot = await asyncio.to_thread(engine_snapshot, self.state)
        registry = self.state.extras.get("sessions")
        open_ids = {e.id for e in registry.entries()} if registry is not None else set()
        served = self.served.snapshot(open_ids)
        return replica_report(self.state, self.name, snapshot, tenant, served, self.drain).as_dict()

    async def set_draining(self, expect: str, on: bool, tenant: str | None) -> dict[str, Any] | None:
        """Starts (on) or ends draining (drain.py); answers the new report."""
        if expect != self.name:
            return None
        self.drain.set(on)
        return await self.report(expect, tenant)

    async def metrics_text(self, expect: str) -> str | None:
        """This replica's own /metrics text (the single server's), for the cluster's /metrics."""
        if expect != self.name:
            return None
        return (await asyncio.to_thread(self.state.extras["metrics"].render)).decode()

    def describe(self) -> dict[str, Any]:
        """What the startup line announces."""
        cfg = self.engine.cfg
        return {"replica": self.name, "model": self.state.model_name, "device": str(cfg.device),
                "dtype": str(cfg.torch_dtype).replace("torch.", ""), "random_weights": self.engine.random_weights}


def build_replica_engine(spec: ReplicaSpec, cluster: ClusterSpec):
    """The replica's engine, built as `omnistream serve` builds its own (entrypoints/serving.build_engine):
    on the GPU Ray gave the replica (CUDA_VISIBLE_DEVICES), with a memory budget of its share
    when it shares one; on CPU with as many threads as the cores it reserved."""
    import torch

    from omnistream.entrypoints.serving import build_engine

    device = spec.device or ("cuda" if cluster.replica_gpus > 0 and torch.cuda.is_available() else "cpu")
    options = dict(spec.engine_options)
    if device.startswith("cuda") and 0 < cluster.replica_gpus < 1 and "memory_budget_bytes" not in options:
        total = torch.cuda.mem_get_info(torch.device(device))[1]
        options["memory_budget_bytes"] = int(GPU_MEMORY_SHARE * cluster.replica_gpus * total)
    if device == "cpu":
        torch.set_num_threads(max(1, round(cluster.replica_cpus)))
    args = SimpleNamespace(model=spec.model, model_config=spec.model_config, weights_seed=spec.weights_seed)
    return build_engine(args, device, spec.dtype, options)
