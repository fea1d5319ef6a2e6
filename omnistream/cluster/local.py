"""A Ray cluster of this machine alone, on the loopback address (tests, `omnistream serve
--replicas` without --ray-address):

    with LocalRay(num_cpus=2):            # ray.init on 127.0.0.1, no dashboard
        start_serve("127.0.0.1", port)   # Serve's HTTP proxy there
        ...
    # leaving the block shuts Serve and Ray down: every process they started has exited

Ray advertises the host's network address even when given 127.0.0.1 (it resolves a loopback
`_node_ip_address` to the address other hosts would reach it on) unless clusters are turned
off for the process tree: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes every Ray process of this
cluster use 127.0.0.1 (raylet, GCS, agents, workers). It is read when `ray` is imported, so it
is set before that and checked after. Ray 2.60's Serve replicas still open their inter-
deployment gRPC port on [::] (hard-coded in ray/serve/_private/replica.py); the cluster's
token authentication (on by default) guards it.

It also puts omnistream's proxy middleware (ingress.py) into the environment the cluster's
processes inherit, so Serve's proxies tell a live socket whose replica died that its session
is lost.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from typing import Any

LOOPBACK = "127.0.0.1"
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class LocalRay:
    """The cluster's session files (sockets, logs) live in a temporary folder of its own,
    removed when the block ends: under Ray's default, /tmp/ray, every test run and every
    `serve --replicas` left a session folder behind."""

    def __init__(self, num_cpus: float | None = None, num_gpus: float | None = None, **init_options: Any) -> None:
        self.num_cpus, self.num_gpus, self.init_options = num_cpus, num_gpus, init_options
        self.pids: set[int] = set()
        self.temp_dir: str | None = None

    def __enter__(self) -> "LocalRay":
        # short: Ray's unix socket paths under it must stay within 107 bytes
        self.temp_dir = self.init_options.pop("_temp_dir", None) or tempfile.mkdtemp(prefix="omray-")
        try:
            start_local_ray(self.num_cpus, self.num_gpus, _temp_dir=self.temp_dir, **self.init_options)
        except BaseException:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.pids = stop_ray()
        if not self.pids:  # a process still alive may still write there (and a failed stop raised above)
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_local_ray(num_cpus: float | None = None, num_gpus: float | None = None, **init_options: Any) -> None:
    from omnistream.cluster.ingress import CALLBACK, CALLBACK_ENV

    if "ray" not in sys.modules:
        os.environ[_LOOPBACK_ENV] = "0"  # workers inherit it from the raylet, the raylet from us
    # Serve's proxies (workers of this cluster) read it: a live socket whose replica dies is told so
    os.environ.setdefault(CALLBACK_ENV, CALLBACK)
    import ray
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:
        raise RuntimeError(f"ray was imported before {_LOOPBACK_ENV}=0 was set: it would advertise this host's network "
                           "address; import omnistream.cluster.local first, or set the variable yourself")
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
             _node_ip_address=LOOPBACK, configure_logging=True, logging_level="WARNING", log_to_driver=True,
             **init_options)


def node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()


def start_serve(host: str, port: int) -> None:
    from ray import serve
    from ray.serve.config import HTTPOptions

    serve.start(http_options=HTTPOptions(host=host, port=port))


def stop_ray(timeout_s: float = 30.0) -> set[int]:
    """Serve and Ray down; waits until the processes Ray started here have exited and returns
    those still alive after `timeout_s` (none, normally)."""
    import ray

    pids = _ray_processes()
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()
    deadline = time.monotonic() + timeout_s
    while (alive := {p for p in pids if _alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def _ray_processes() -> set[int]:
    """The processes of the Ray session started here: descendants of this process that run
    Ray (raylet, GCS, agents, `ray::` workers), and any process naming the session's directory."""
    import ray

    try:
        session_dir = ray._private.worker._global_node.get_session_dir_path()
    except AttributeError:  # not started here
        return set()
    out = set()
    for pid in _all_pids():
        cmd = _cmdline(pid)
        if session_dir in cmd or ("ray" in cmd and _parent_chain_has(pid, os.getpid())):
            out.add(pid)
    out.discard(os.getpid())
    return out


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parent_chain_has(pid: int, ancestor: int) -> bool:
    for _ in range(32):
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
    return False


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except OSError:
        return False
