"""The Ray Serve application: N EngineReplicas behind omnistream's session-affinity router.

    app = application(ReplicaSpec(model="demo"), ClusterSpec(replicas=2))
    serve.run(app, name=APP_NAME, route_prefix="/")

For a Serve config file (`serve run` / `serve deploy`), `build` is the application builder:

    applications:
      - name: omnistream
        route_prefix: /
        import_path: omnistream.cluster.deploy:build
        args: {model: /models/qwen2.5-vl-3b, replicas: 2, replica_gpus: 0.5,
               engine: {max_num_seqs: 64}, server: {api_key: secret, max_sessions: 128}}

(the `http_options` of the file say where Serve's proxy listens; `host`/`port` in `args` are
for `omnistream serve --replicas` only). The name must be `omnistream` for GET /v1/replicas
and /metrics to reach the replicas (spec.APP_NAME).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.config import RequestRouterConfig

from omnistream.cluster.replica import EngineReplica
from omnistream.cluster.spec import DEPLOYMENT_NAME, ROUTER_CLASS, ROUTING_STATS_PERIOD_S, ClusterSpec, ReplicaSpec
from omnistream.engine.sampling import SamplingParams
from omnistream.server.config import ServerConfig


def application(replica: ReplicaSpec, cluster: ClusterSpec) -> "serve.Application":
    deployment = serve.deployment(
        EngineReplica,
        name=DEPLOYMENT_NAME,
        num_replicas=cluster.replicas,
        ray_actor_options={"num_cpus": cluster.replica_cpus, "num_gpus": cluster.replica_gpus},
        max_ongoing_requests=cluster.ongoing_limit(replica.server),
        health_check_period_s=cluster.health_check_period_s,
        # Serve's own access log off: the server writes one line per request (server/ops.py)
        logging_config={"log_level": "WARNING", "enable_access_log": False},
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER_CLASS, request_routing_stats_period_s=ROUTING_STATS_PERIOD_S),
    )
    return deployment.bind(replica, cluster)


class ClusterArgs(BaseModel):
    """`args` of a Serve config's application (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str | None = "demo"
    model_preset: str | None = None  # a random-weight architecture (ReplicaSpec.model_config)
    weights_seed: int = 0
    device: str | None = None
    dtype: str = "auto"
    replicas: int = Field(1, ge=1)
    replica_gpus: float = Field(0.0, ge=0)
    replica_cpus: float = Field(1.0, ge=0)
    health_check_period_s: float = Field(10.0, gt=0)
    engine: dict[str, Any] = Field(default_factory=dict)  # EngineConfig fields
    server: dict[str, Any] = Field(default_factory=dict)  # ServerConfig fields
    sampling: dict[str, Any] | None = None  # SamplingParams fields for what a request leaves out
    max_tokens: int | None = None  # max_tokens of a request that sets none


def build(args: dict[str, Any]) -> "serve.Application":
    """Serve's application builder (import_path omnistream.cluster.deploy:build)."""
    a = ClusterArgs.model_validate(args)
    replica = ReplicaSpec(model=a.model, model_config=a.model_preset, weights_seed=a.weights_seed, device=a.device,
                          dtype=a.dtype, engine_options=a.engine, server=ServerConfig(**a.server),
                          default_sampling=SamplingParams(**a.sampling) if a.sampling is not None else None,
                          default_max_tokens=a.max_tokens)
    cluster = ClusterSpec(replicas=a.replicas, replica_gpus=a.replica_gpus, replica_cpus=a.replica_cpus,
                          health_check_period_s=a.health_check_period_s)
    return application(replica, cluster)
