"""An engine process that stops answering or dies, seen from the server and the library (found
by a fresh-clone user trial): nothing waits forever for it, a dead one is a 503 (never a 500,
never a session that can never answer), and the engine process runs the server's own code
whatever folder the server was started from."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from fastapi.testclient import TestClient

from omnistream import Engine
from omnistream.engine import remote_core
from omnistream.errors import EngineUnavailable
from omnistream.server.app import build_app
from omnistream.server.config import ServerConfig
from tests.test_engine_process import OPTS, _child_pid


def test_engine_process_runs_this_package_whatever_the_working_directory(tiny_model_dir, tmp_path):
    shadow = tmp_path / "omnistream"
    (shadow / "engine").mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise SystemExit("the engine imported another omnistream")\n')
    (shadow / "engine" / "__init__.py").write_text("")
    script = tmp_path.parent / f"{tmp_path.name}-run.py"  # outside the folder: sys.path[0] is not it
    script.write_text(textwrap.dedent(f"""
        from omnistream import Engine, SamplingParams
        eng = Engine.from_pretrained({str(tiny_model_dir)!r}, engine_process=True, kv_cache_tokens=4096)
        print("tokens", eng.generate([{{"role": "user", "content": "hi"}}], SamplingParams(max_new_tokens=2))[0].token_ids)
        eng.close()
    """))
    import omnistream

    env = {**os.environ, "PYTHONPATH": str(os.path.dirname(os.path.dirname(omnistream.__file__)))}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tokens [" in out.stdout


def test_a_stopped_engine_process_hangs_nothing(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(remote_core, "OP_TIMEOUT_S", 1.0)
    eng = Engine.from_pretrained(tiny_model_dir, engine_process=True, **OPTS)
    pid = _child_pid(eng)
    session = eng.session()
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            eng.stats(timeout=0.5)
        with pytest.raises(EngineUnavailable, match="did not answer"):
            eng.core.run_op("noop")  # no timeout given: the default one
        session.close()  # a server's shutdown closes its sessions: it must not wait for the engine
        assert time.monotonic() - t0 < 5
        with TestClient(build_app(eng, ServerConfig())) as client:
            t0 = time.monotonic()
            r = client.get("/metrics")
            assert r.status_code == 200 and "omnistream_engine_up 0.0" in r.text
            assert client.get("/health").status_code == 503
            assert time.monotonic() - t0 < 15
    finally:
        os.kill(pid, signal.SIGCONT)
        eng.close()


def test_a_dead_engine_process_is_a_503(tiny_model_dir):
    eng = Engine.from_pretrained(tiny_model_dir, engine_process=True, **OPTS)
    try:
        with TestClient(build_app(eng, ServerConfig())) as client:
            os.kill(_child_pid(eng), signal.SIGKILL)
            deadline = time.monotonic() + 10
            while eng.core.alive and time.monotonic() < deadline:
                time.sleep(0.05)
            chat = client.post("/v1/chat/completions", json={"model": client.get("/v1/models").json()["data"][0]["id"],
                                                            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert chat.status_code == 503 and chat.json()["error"]["code"] == "engine_unavailable", chat.text
            created = client.post("/v1/sessions", json={})
            assert created.status_code == 503, created.text
    finally:
        eng.close()
