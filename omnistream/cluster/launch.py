"""`omnistream serve --replicas N [--replica-gpus F] [--replica-cpus C] [--ray-address ADDR]`:
the same server as `omnistream serve`, as N engine replicas under Ray Serve (deploy.py), on
Serve's HTTP proxy at --host/--port.

Without --ray-address a Ray cluster of this machine is started on the loopback address
(local.py) and stopped on exit; with it (`ray start --head` on one host, `ray start
--address=...` on the others) the replicas are spread over that cluster (start its nodes with
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=omnistream.cluster.ingress:proxy_middlewares, so a
live socket whose replica dies is told; ingress.py). Every other flag of
`serve` (model, engine options, limits, default sampling) applies to each replica. Ctrl-C
deletes the application (the replicas close their engines) and exits 130.

This module imports Ray only when the command runs: `serve` without --replicas needs none.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import time

from omnistream.entrypoints import options
from omnistream.errors import ConfigError

INSTALL_HINT = "--replicas needs Ray Serve: pip install 'omnistream[cluster]'"


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("replicas (Ray Serve; pip install 'omnistream[cluster]')")
    group.add_argument("--replicas", type=options.at_least(int, 1), default=None,
                       help="serve with this many engine replicas under Ray Serve, sessions pinned to their replica "
                            "(default: one process, no Ray)")
    group.add_argument("--replica-gpus", type=options.at_least(float, 0), default=None,
                       help="GPUs per replica: 1, or a fraction to share one (0.5: two replicas per GPU, each with "
                            "half its memory); 0: CPU replicas (default: 1 where the GPU is visible, else 0)")
    group.add_argument("--replica-cpus", type=options.at_least(float, 0), default=1.0,
                       help="CPU cores reserved per replica (default: 1)")
    group.add_argument("--ray-address", default=None,
                       help="an existing Ray cluster (e.g. 10.0.0.1:6379); default: start one on this machine, "
                            "on 127.0.0.1")


def specs_from_args(args):
    """The flags -> (ReplicaSpec, ClusterSpec), validated before Ray starts or a model loads."""
    from omnistream.cluster.spec import ClusterSpec, ReplicaSpec
    from omnistream.entrypoints.serving import bind_socket, server_sampling

    if args.model is None and args.model_config is None:
        raise ConfigError("give --model DIR (a checkpoint directory) or --model demo (or --model-config)")
    config = options.server_config(args)
    gpus = args.replica_gpus if args.replica_gpus is not None else (1.0 if _gpu_visible(args.device) else 0.0)
    device = args.device or ("cuda" if gpus > 0 else "cpu")
    engine_options = options.engine_options(args)
    options.check_engine_options(device, args.dtype, engine_options)
    port = config.port
    if port == 0:  # Serve's proxy takes a fixed port: pick a free one for it
        sock = bind_socket(config.host, 0)
        port = sock.getsockname()[1]
        sock.close()
    replica = ReplicaSpec(model=None if args.model_config else args.model, model_config=args.model_config,
                          weights_seed=args.weights_seed, device=args.device, dtype=args.dtype,
                          engine_options=engine_options, server=dataclasses.replace(config, port=port),
                          default_sampling=server_sampling(args),
                          default_max_tokens=options.sampling_kwargs(args).get("max_new_tokens"))
    cluster = ClusterSpec(replicas=args.replicas, replica_gpus=gpus, replica_cpus=args.replica_cpus,
                          host=config.host, port=port)
    return replica, cluster


def serve_replicas(args) -> int:
    replica, cluster = specs_from_args(args)
    if importlib.util.find_spec("ray") is None:  # not imported: local.py sets Ray's environment first
        raise ConfigError(INSTALL_HINT)
    from omnistream.cluster.local import LocalRay

    if args.ray_address is None:
        with LocalRay():
            return _run(replica, cluster)
    import ray

    ray.init(address=args.ray_address)
    try:
        return _run(replica, cluster)
    finally:
        ray.shutdown()


def _run(replica, cluster) -> int:
    from ray import serve

    from omnistream.cluster.deploy import application
    from omnistream.cluster.local import start_serve
    from omnistream.cluster.spec import APP_NAME

    start_serve(cluster.host, cluster.port)
    try:
        handle = serve.run(application(replica, cluster), name=APP_NAME, route_prefix="/")
    except RuntimeError as e:  # DEPLOY_FAILED: a replica's constructor raised (bad model, no memory)
        raise ConfigError(f"the replicas did not start: {e}") from None
    try:
        print(startup_line(replica, cluster, handle.describe.remote().result()), flush=True)
        while True:
            time.sleep(3600)
    finally:
        serve.delete(APP_NAME)


def startup_line(replica, cluster, info: dict) -> str:
    from omnistream.entrypoints.serving import STARTUP_PREFIX

    host = f"[{cluster.host}]" if ":" in cluster.host else cluster.host
    where = f"built as a random {replica.model_config} architecture" if replica.model_config else f"from {replica.model}"
    weights = "; RANDOM weights: answers are meaningless text" if info["random_weights"] else ""
    return (f"{STARTUP_PREFIX}http://{host}:{cluster.port} (model {info['model']!r} {where}; {cluster.replicas} "
            f"replicas under Ray Serve, {cluster.replica_gpus:g} GPU + {cluster.replica_cpus:g} CPU each; "
            f"{info['device']} {info['dtype']}{weights})")


def _gpu_visible(device: str | None) -> bool:
    if device is not None:
        return device.startswith("cuda")
    import torch

    return torch.cuda.is_available()
