"""What a cluster is built from, as typed, picklable contracts (they travel to every replica):

    ReplicaSpec   one replica's engine and server: the same model, engine options, limits and
                  default sampling as `omnistream serve` without --replicas
    ClusterSpec   how many replicas and what each takes of a node (GPUs, fractional allowed;
                  CPUs), and the HTTP address of Serve's proxy
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omnistream.engine.sampling import SamplingParams
from omnistream.errors import ConfigError
from omnistream.server.config import ServerConfig

APP_NAME = "omnistream"
DEPLOYMENT_NAME = "EngineReplica"
ROUTER_CLASS = "omnistream.cluster.router:SessionAffinityRouter"
ROUTING_STATS_PERIOD_S = 1.0  # how often each replica reports its load to the routers (through Serve's controller)
GPU_MEMORY_SHARE = 0.9  # of its share of a GPU, what a fractional-GPU replica's engine may use


@dataclass(frozen=True)
class ReplicaSpec:
    model: str | None = "demo"  # checkpoint directory, or "demo"
    model_config: str | None = None  # a random-weight preset instead (3b, 7b, tiny): load tests
    weights_seed: int = 0
    device: str | None = None  # None: cuda where the replica has a GPU, else cpu
    dtype: str = "auto"
    engine_options: dict[str, Any] = field(default_factory=dict)  # EngineConfig fields, as `serve` takes them
    server: ServerConfig = field(default_factory=ServerConfig)
    default_sampling: SamplingParams | None = None  # for the fields a request leaves out
    default_max_tokens: int | None = None  # max_tokens of a request that sets none

    def __post_init__(self) -> None:
        if self.model is None and self.model_config is None:
            raise ConfigError("a replica needs a model: a checkpoint directory, demo, or a model_config preset")

    @property
    def served_model_name(self) -> str | None:
        if self.server.served_model_name is None and self.model_config:
            return f"random-{self.model_config}"  # as `omnistream serve --model-config` names it
        return self.server.served_model_name


@dataclass(frozen=True)
class ClusterSpec:
    replicas: int = 1
    replica_gpus: float = 0.0  # GPUs per replica: 1 (the default on a GPU host), 0.5 (two per GPU), 0 (CPU)
    replica_cpus: float = 1.0  # CPU cores reserved per replica
    host: str = "127.0.0.1"  # where Serve's HTTP proxy listens
    port: int = 8000
    health_check_period_s: float = 10.0  # Serve's check of each replica (an engine loop round trip)
    max_ongoing_requests: int | None = None  # per replica; None: sessions + queued requests of ServerConfig

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"replicas must be at least 1, got {self.replicas}")
        if self.replica_gpus < 0 or (self.replica_gpus > 1 and self.replica_gpus != int(self.replica_gpus)):
            raise ConfigError(f"replica_gpus must be a fraction of one GPU (0 < f <= 1) or a whole number, got {self.replica_gpus}")
        if self.replica_cpus < 0:
            raise ConfigError(f"replica_cpus must be >= 0, got {self.replica_cpus}")
        if not (0 < self.port < 65536):
            raise ConfigError(f"the cluster's port must be 1..65535, got {self.port}")

    def ongoing_limit(self, server: ServerConfig) -> int:
        """Serve's cap of requests in flight on one replica. Every open /v1/realtime socket holds
        one for its lifetime, so Serve's default (5) would starve a replica of sockets; the
        server's own limits (429 over max_sessions, 503 over max_queued_requests) bind first."""
        return self.max_ongoing_requests or server.max_sessions + server.max_queued_requests
