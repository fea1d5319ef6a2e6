"""`omnistream serve --replicas`: bad replica flags are usage errors before anything starts; the
command starts its own loopback Ray cluster, prints the startup line bench serve reads, serves
sessions on its replica, and on Ctrl-C exits 130 leaving no Ray process behind."""

from __future__ import annotations

import importlib.util
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from omnistream.cluster.placement import REPLICA_HEADER, replica_of
from omnistream.cluster.spec import ClusterSpec
from omnistream.entrypoints.serve_cli import parse_startup_line
from omnistream.errors import ConfigError
from omnistream.server.config import ServerConfig


def omnistream(*argv: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "omnistream", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, **kw)


def test_cluster_spec_limits():
    assert ClusterSpec(replicas=2, replica_gpus=0.5).replica_gpus == 0.5
    for bad in (dict(replicas=0), dict(replica_gpus=1.5), dict(replica_gpus=-1), dict(replica_cpus=-1), dict(port=0)):
        with pytest.raises(ConfigError):
            ClusterSpec(**bad)
    # every open live socket holds one of Serve's slots for its lifetime: the server's limits bind first
    assert ClusterSpec().ongoing_limit(ServerConfig(max_sessions=8, max_queued_requests=16)) == 24


@pytest.mark.parametrize("flags, message", [
    (["--replicas", "0"], "must be at least 1"),
    (["--replicas", "2", "--replica-gpus", "1.5"], "replica_gpus must be a fraction"),
    (["--replicas", "2", "--replica-cpus", "-1"], "must be >= 0"),
])
def test_bad_replica_flags_are_usage_errors(flags, message):
    proc = omnistream("serve", "--model", "demo", "--device", "cpu", *flags)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, (out, err)
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray Serve is not installed (pip install 'omnistream[cluster]')")
def test_serve_replicas_starts_serves_and_stops_clean():
    proc = omnistream("serve", "--model", "demo", "--device", "cpu", "--port", "0", "--replicas", "1",
                      "--replica-gpus", "0", "--api-key", "k")
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    stderr: list[str] = []
    threading.Thread(target=lambda: [stderr.append(line) for line in proc.stderr], daemon=True).start()
    try:
        url, deadline = None, time.monotonic() + 120
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            url = parse_startup_line(line)
        assert url, "no startup line:\n" + "".join(stderr[-30:])
        assert url.startswith("http://127.0.0.1:") and "1 replicas under Ray Serve" in line and "RANDOM weights" in line
        client = httpx.Client(base_url=url, headers={"Authorization": "Bearer k"}, timeout=60)
        r = client.post("/v1/sessions", json={})
        sid, replica = r.json()["id"], r.headers[REPLICA_HEADER]
        assert replica_of(sid) == replica
        body = {"model": "demo-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
        r = client.post("/v1/chat/completions", json=body, headers={"X-Session-Id": sid})
        assert r.status_code == 200 and r.headers[REPLICA_HEADER] == replica, r.text
        started = _children_running(proc.pid, "ray")  # raylet, GCS, agents, ray:: workers
        assert [p for p in started if "raylet" in _cmdline(p)], "the command started no Ray cluster of its own"
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=90)
    assert code == 130, "".join(stderr[-30:])
    assert "interrupted" in "".join(stderr)
    left = [p for p in started if _cmdline(p)]
    assert not left, f"Ray processes outlived the command: {[_cmdline(p)[:80] for p in left]}"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _children_running(root: int, needle: str) -> list[int]:
    """Descendants of `root` whose command line contains `needle`."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = parent = int(name)
        if needle not in _cmdline(pid):
            continue
        for _ in range(32):
            try:
                with open(f"/proc/{parent}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                break
            if parent == root:
                out.append(pid)
                break
            if parent <= 1:
                break
    return out
