"""The command line around the server: `omnistream serve` as a user starts it (a subprocess on a
free port, the demo model), `--version`, `python -m omnistream`, every engine and sampling
option as a flag, one-line errors for bad flag values."""

from __future__ import annotations

import argparse
import io
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

import omnistream
from omnistream.config import CacheConfig, EngineConfig, SchedulerConfig
from omnistream.engine.sampling import SamplingParams
from omnistream.entrypoints import options
from omnistream.entrypoints.cli import build_parser, main
from omnistream.entrypoints.serve_cli import STARTUP_PREFIX, parse_startup_line
from omnistream.errors import ConfigError
from omnistream.server.config import ServerConfig

REPO = Path(omnistream.__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    path = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omnistream", *args], env=_env(), capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------- the server
def _engine_processes(parent: int) -> list[int]:
    """Pids of the engine processes (python -m omnistream.engine.core_process) whose parent is `parent`."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"omnistream.engine.core_process" in cmdline and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def _exited(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


class Served:
    def __init__(self, proc: subprocess.Popen, line: str, url: str) -> None:
        self.proc, self.line, self.url = proc, line, url


@pytest.fixture(scope="module")
def served():
    """`python -m omnistream serve --model demo --port 0 ...`, until its startup line."""
    proc = subprocess.Popen([sys.executable, "-m", "omnistream", "serve", "--model", "demo", "--device", "cpu", "--port", "0",
                             "--kv-cache-tokens", "8192", "--temperature", "0"],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        line = lines.get(timeout=120)
    except queue.Empty:
        proc.kill()
        pytest.fail("no startup line in 120 s: " + proc.stderr.read())
    url = parse_startup_line(line)
    assert url, line
    yield Served(proc, line, url)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_startup_line_says_where_and_which_model(served):
    assert served.line.startswith(STARTUP_PREFIX + "http://127.0.0.1:")  # loopback by default
    assert int(served.url.rsplit(":", 1)[1]) > 0  # --port 0: the real port, not 0
    assert "model 'demo-model'" in served.line and "RANDOM weights" in served.line and "cpu float32" in served.line
    assert "uvicorn on uvloop + httptools" in served.line  # both are dependencies: the fast pair


def test_health_and_a_chat_completion(served):
    assert httpx.get(served.url + "/health", timeout=10).status_code == 200
    request = {"model": "demo-model", "max_tokens": 6, "messages": [{"role": "user", "content": "Say hi."}]}
    r = httpx.post(served.url + "/v1/chat/completions", timeout=60, json=request)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] <= 6 and body["choices"][0]["message"]["content"]
    # --temperature 0 is the server's default for requests that name none (OpenAI's is 1:
    # random weights would sample a different answer each time)
    again = httpx.post(served.url + "/v1/chat/completions", timeout=60, json=request).json()
    assert again["choices"][0]["message"]["content"] == body["choices"][0]["message"]["content"]


def test_ctrl_c_exits_quietly(served):
    # the last test of the module: SIGINT as a terminal's Ctrl-C, while a request streams
    with httpx.Client(base_url=served.url, timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json={"model": "demo-model", "stream": True, "max_tokens": 2000,
                                                               "ignore_eos": True, "messages": [{"role": "user", "content": "Go on."}]}) as r:
            assert r.status_code == 200
            next(r.iter_lines())
            [engine] = _engine_processes(served.proc.pid)  # serve runs its engine core in a process of its own
            served.proc.send_signal(signal.SIGINT)
            t0 = time.monotonic()
            out, err = served.proc.communicate(timeout=60)
    assert served.proc.returncode == 130, err
    assert time.monotonic() - t0 < 30  # the open stream is cut after --shutdown-timeout-s
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err
    assert err.lower().count("random weights") == 0  # announced once, in the startup line
    assert _exited(engine)  # the server closed its engine process before it exited


def test_sigterm_stops_it_as_ctrl_c_does():
    """docker stop / systemd send SIGTERM: the same graceful stop (it used to kill the process
    after uvicorn's shutdown, before the engine and sessions were closed), reported as its own
    (`terminated`, exit 143; it printed `interrupted` and exited 130, found by a fresh-clone trial). systemd
    signals the whole cgroup: the engine process ignores it, the server stops it after its own
    graceful shutdown."""
    proc = subprocess.Popen([sys.executable, "-m", "omnistream", "serve", "--model", "demo", "--device", "cpu", "--port", "0",
                             "--kv-cache-tokens", "4096"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().startswith(STARTUP_PREFIX)
        [engine] = _engine_processes(proc.pid)
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its engine process
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err  # 128 + SIGTERM: what docker and systemd expect of a stopped service
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "terminated", err
    assert _exited(engine)


def test_a_stop_signal_closes_live_sockets_as_documented():
    """An open /v1/realtime socket at SIGTERM: the session_expired event, then a close with 1001
    (going away). uvicorn's shutdown closed it with 1012 and no event (a fresh-clone trial)."""
    import json
    import struct

    import websocket

    proc = subprocess.Popen([sys.executable, "-m", "omnistream", "serve", "--model", "demo", "--device", "cpu", "--port", "0",
                             "--kv-cache-tokens", "4096"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = parse_startup_line(proc.stdout.readline())
        ws = websocket.create_connection(url.replace("http", "ws") + "/v1/realtime", timeout=60)
        assert json.loads(ws.recv())["type"] == "session.created"
        proc.send_signal(signal.SIGTERM)
        event = json.loads(ws.recv())
        assert event["type"] == "error" and event["error"]["code"] == "session_expired", event
        opcode, data = ws.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE and struct.unpack("!H", data[:2])[0] == 1001
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143 and "Traceback" not in err, err


def test_sigint_to_a_background_job_still_says_it_was_interrupted():
    """A shell's background job (`omnistream serve ... &`) starts with SIGINT ignored: uvicorn
    still stops on it, but its re-raise of the signal did nothing and the server exited 0 with
    no word (found by a fresh-clone trial). It says `interrupted` and exits 130."""
    proc = subprocess.Popen([sys.executable, "-m", "omnistream", "serve", "--model", "demo", "--device", "cpu", "--port", "0",
                             "--kv-cache-tokens", "4096"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        url = parse_startup_line(proc.stdout.readline())
        [engine] = _engine_processes(proc.pid)
        # the startup line comes before uvicorn installs its handlers: until then SIGINT is ignored
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err
    assert _exited(engine)


def test_ctrl_c_during_startup_is_quiet():
    """A terminal's Ctrl-C reaches its whole foreground process group. During startup it used to
    interrupt the engine process inside `import torch` too: its traceback on the terminal (a
    fresh-clone trial). The engine process has a group of its own; the server stops it."""
    proc = subprocess.Popen([sys.executable, "-m", "omnistream", "serve", "--model", "demo", "--device", "cpu", "--port", "0",
                             "--kv-cache-tokens", "4096"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        engines = []
        while not engines and time.monotonic() < deadline and proc.poll() is None:
            engines = _engine_processes(proc.pid)
            time.sleep(0.02)
        assert engines, "no engine process started"
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the terminal's foreground group
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        proc.kill()
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    # the engine process, still building, is not waited for (5 s, terminate, 5 s more: 10.6 s
    # and a warning, found by a fresh-clone trial)
    assert "did not stop" not in err and took < 5, (took, err)
    assert proc.returncode in (2, 130), err
    deadline = time.monotonic() + 20
    while not all(_exited(e) for e in engines) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_exited(e) for e in engines)


def test_stop_signal_ends_long_streams_cleanly():
    """A stop signal while a long answer streams (found by a fresh-clone trial: the stream was
    cancelled at the end of the graceful period, a 60-line traceback in the log and a broken
    chunked response for the client): the stream ends at once with a server_shutting_down
    error event and [DONE], quietly, well within --shutdown-timeout-s."""
    proc = subprocess.Popen([sys.executable, "-m", "omnistream", "serve", "--model", "demo", "--device", "cpu", "--port", "0",
                             "--kv-cache-tokens", "16384", "--shutdown-timeout-s", "30"], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = parse_startup_line(proc.stdout.readline())
        events = []
        with httpx.Client(base_url=url, timeout=60) as client:
            with client.stream("POST", "/v1/chat/completions", json={
                    "model": "demo-model", "stream": True, "max_tokens": 12000, "ignore_eos": True,
                    "messages": [{"role": "user", "content": "Go on."}]}) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                next(lines)
                proc.send_signal(signal.SIGTERM)
                t0 = time.monotonic()
                events = [x for x in lines if x.startswith("data: ")]
                took = time.monotonic() - t0
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert events and events[-1] == "data: [DONE]", events[-3:]
    assert "server_shutting_down" in events[-2], events[-2]
    assert took < 15, took  # ended at the signal, not at the end of the 30 s graceful period
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "Cancel" not in err and err.strip().splitlines()[-1] == "terminated", err


# ---------------------------------------------------------------------------------- entry points
def test_version_and_python_dash_m():
    v = _run("--version")
    assert v.returncode == 0 and v.stdout.strip() == f"omnistream {options_version()}"
    h = _run("--help")
    assert h.returncode == 0
    for cmd in ("ask", "demo", "stream", "serve", "bench"):
        assert cmd in h.stdout


def options_version() -> str:
    from importlib.metadata import version

    return version("omnistream")


def _help(*cmd: str) -> str:
    parser = build_parser()
    sub = parser
    for name in cmd:  # the subcommand's own parser
        sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return sub.format_help()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


ENGINE_OPTIONS = ("memory_budget_bytes", "kv_cache_tokens", "encoder_cache_bytes", "encoder_cache_cpu_bytes", "enable_prefix_caching",
                  "session_kv_budget_tokens", "offload_vision", "max_num_batched_tokens", "max_num_seqs",
                  "max_step_tokens_while_decoding", "enable_chunked_prefill", "block_size", "cuda_graphs")


@pytest.mark.parametrize("cmd", [("ask",), ("stream",), ("serve",), ("demo",)])
def test_engine_and_sampling_flags_with_help_and_defaults(cmd):
    text = " ".join(_help(*cmd).split())  # argparse wraps lines
    for name in ENGINE_OPTIONS + ("max_new_tokens", "temperature", "top_p", "top_k", "seed"):
        assert _flag(name) in text, (cmd, name)
    assert "--memory-budget-gib" in text
    assert "tokens per KV block (default: 16)" in text and "sequences running at once (default: 64)" in text
    if cmd == ("ask",):
        assert "most tokens in one answer (default: 64)" in text


def test_every_dataclass_field_is_a_flag():
    """A new engine option, sampling field or server setting becomes a flag by itself."""
    import dataclasses

    serve = " ".join(_help("serve").split())
    for cls in (CacheConfig, SchedulerConfig, ServerConfig):
        for f in dataclasses.fields(cls):
            assert _flag(f.name) in serve, f.name
    for f in dataclasses.fields(EngineConfig):
        if f.name not in ("model", "device", "dtype", "cache", "scheduler"):
            assert _flag(f.name) in serve, f.name
    for f in dataclasses.fields(SamplingParams):
        if f.name not in options.SAMPLING_SKIP:
            assert _flag(f.name) in serve, f.name
    for opt in options.engine_option_list() + options.server_option_list():
        assert opt.help, opt.name  # every flag explains itself


def test_flags_reach_the_engine_and_sampling():
    parser = build_parser()
    args = parser.parse_args(options.normalize_argv([
        "ask", "x.mp4", "q", "--kv-cache-tokens", "4096", "--no-enable-prefix-caching", "--max_num_seqs", "8",
        "--encoder-cache-bytes", "64MiB", "--memory-budget-gib", "2", "--temperature", "0.7", "--top-k", "5", "--seed", "3"]))
    assert options.engine_options(args) == {"kv_cache_tokens": 4096, "enable_prefix_caching": False, "max_num_seqs": 8,
                                            "encoder_cache_bytes": 64 << 20, "memory_budget_bytes": 2 << 30}
    assert options.sampling_params(args) == SamplingParams(temperature=0.7, top_k=5, seed=3, max_new_tokens=64)
    # nothing given: nothing passed, the dataclasses' defaults apply
    bare = parser.parse_args(["ask", "x.mp4", "q"])
    assert options.engine_options(bare) == {} and options.sampling_params(bare) == SamplingParams(max_new_tokens=64)
    # and the round trip to a subprocess's flags
    again = parser.parse_args(["ask", "x.mp4", "q", *options.to_flags(options.engine_options(args))])
    assert options.engine_options(again) == options.engine_options(args)


def test_ask_passes_engine_options_to_the_engine(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from omnistream.media.samples import write_image

    image = write_image(tmp_path / "a.png", width=56, height=56)
    import omnistream.entrypoints.cli as cli

    seen, real = {}, cli.load_engine

    def spy(model, device, dtype, notice=True, **kw):
        seen.update(kw)
        engine = real(model, device, dtype, notice, **kw)
        seen["pool_tokens"] = engine.stats()["kv_blocks_total"] * engine.cfg.cache.block_size
        return engine

    monkeypatch.setattr(cli, "load_engine", spy)
    rc = main(["ask", str(image), "What?", "--model", str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", "2",
               "--kv-cache-tokens", "2048", "--block-size", "32", "--seed", "1", "--temperature", "0.5"])
    assert rc == 0, capsys.readouterr().err
    assert seen == {"kv_cache_tokens": 2048, "block_size": 32, "pool_tokens": 2048}
    assert re.search(r"output tokens\s+2\b", capsys.readouterr().out)


@pytest.mark.parametrize(("argv", "expected"), [
    (["ask", "x.mp4", "q", "--temperature", "warm"], "argument --temperature: expected a number, got 'warm'"),
    (["ask", "x.mp4", "q", "--kv-cache-tokens", "lots"], "argument --kv-cache-tokens: expected an integer, got 'lots'"),
    (["ask", "x.mp4", "q", "--encoder-cache-bytes", "2 potatoes"], "argument --encoder-cache-bytes: expected bytes"),
    (["serve", "--model", "demo", "--port", "http"], "argument --port: expected an integer, got 'http'"),
    (["serve", "--model", "demo", "--log-level", "loud"], "argument --log-level: invalid choice: 'loud'"),
    (["ask", "x.mp4", "q", "--no-such-flag"], "unrecognized arguments: --no-such-flag (see: omnistream ask --help)"),
    (["bench", "concurrency", "--no-such-flag"], "unrecognized arguments: --no-such-flag (see: omnistream bench concurrency --help)"),
])
def test_bad_flag_value_is_one_line(argv, expected, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


@pytest.mark.parametrize(("argv", "expected"), [
    (["serve", "--model", "demo", "--port", "70000"], "--port must be 0..65535, got 70000"),
    (["serve", "--model", "demo", "--max-sessions", "0"], "--max-sessions must be positive, got 0"),
    (["serve", "--model", "demo", "--block-size", "3"], "--block-size must be a power of two, got 3"),
    (["serve", "--model", "demo", "--top-p", "0"], "--top-p must be a number in (0, 1], got 0.0"),
    (["serve", "--model", "demo", "--allowed-media-path", "/no/such/dir"], "--allowed-media-path /no/such/dir: not a directory"),
    (["ask", "x.mp4", "q", "--prefill-cap-scope", "bogus"], "--prefill-cap-scope must be one of per_request, per_step, each_request, got 'bogus'"),
    (["ask", "x.mp4", "q", "--max-prefill-tokens-while-decoding", "0"], "--max-prefill-tokens-while-decoding must be positive, got 0"),
    (["ask", "x.mp4", "q", "--kv-cache-tokens", "10"], "--kv-cache-tokens must hold at least one block"),
    (["serve"], "give --model DIR"),
    (["ask", "x.mp4", "q", "--memory-budget-gib", "-1"], "--memory-budget-gib must be positive"),
    (["ask", "x.mp4", "q", "--memory-budget-gib", "1", "--memory-budget-bytes", "1GiB"], "not both"),
])
def test_bad_option_is_one_line_before_loading(argv, expected, capsys, monkeypatch):
    import omnistream.entrypoints.cli as cli
    import omnistream.entrypoints.engine_args as engine_args

    never = lambda *a, **k: pytest.fail("a model was loaded before the flags were checked")  # noqa: E731
    monkeypatch.setattr(cli, "load_engine", never)  # ask, demo
    monkeypatch.setattr(engine_args, "load_engine", never)  # serve, stream
    assert main([*argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


def test_busy_port_is_one_line(capsys):
    from omnistream.entrypoints.serve_cli import bind_socket

    with bind_socket("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            bind_socket("127.0.0.1", port)


def test_sizes_and_lists_parse():
    assert options.parse_bytes("8GiB") == 8 << 30 and options.parse_bytes("512M") == 512 << 20 and options.parse_bytes("100") == 100
    assert options.parse_bytes("1.5g") == 3 << 29
    assert options.parse_int_list("1,2, 3") == (1, 2, 3)
    for bad in ("-1", "GiB", "1 parsec"):
        with pytest.raises(argparse.ArgumentTypeError):
            options.parse_bytes(bad)


# ---------------------------------------------------------------------------------- docs
REFERENCE = REPO / "docs" / "reference.md"


def _flags_of(*cmd: str) -> set[str]:
    parser = build_parser()
    for name in cmd:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}


@pytest.mark.parametrize("cmd", [("ask",), ("demo",), ("stream",), ("serve",), ("bench", "serve")])
def test_reference_lists_every_flag(cmd):
    text = REFERENCE.read_text()
    missing = sorted(f for f in _flags_of(*cmd) if f"`{f}" not in text and f"{f}`" not in text and f" {f} " not in text)
    assert not missing, f"docs/reference.md lacks {missing} of {' '.join(cmd)}"


def test_reference_lists_every_route_and_metric(tiny_model_dir):
    from starlette.testclient import TestClient

    from omnistream.entrypoints.api import Engine
    from omnistream.server.app import build_app

    text = REFERENCE.read_text()
    with Engine.from_pretrained(tiny_model_dir, device="cpu", kv_cache_tokens=1024) as engine:
        app = build_app(engine)
        paths = {r.path for r in app.routes}
        with TestClient(app) as client:
            exposition = client.get("/metrics").text
    assert not sorted(p for p in paths if f"`{p}" not in text), "routes missing from docs/reference.md"
    types = [line.split()[2:4] for line in exposition.splitlines() if line.startswith("# TYPE")]
    families = {re.sub(r"_total$", "", name) if kind == "counter" else name for name, kind in types
                if not name.endswith("_created")}  # prometheus-client's creation-time gauges
    assert len(families) > 10
    assert not sorted(f for f in families if f"`{f}`" not in text), "metrics missing from docs/reference.md"


# ---------------------------------------------------------------------------------- progress
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal_and_only_for_long_work():
    from omnistream.entrypoints.progress import Progress

    tty = _Terminal()
    with Progress("quick", stream=tty, delay_s=0.5):
        pass  # done before the delay: nothing drawn
    assert tty.getvalue() == ""
    with Progress("loading model demo", stream=tty, delay_s=0.05):
        time.sleep(0.5)  # unknown length: the ticker redraws the elapsed time
    assert "loading model demo" in tty.getvalue()
    tty = _Terminal()
    with Progress("answer", total=10, unit="tok", stream=tty, delay_s=0.05) as bar:
        time.sleep(0.1)
        bar.update(4)
        time.sleep(0.3)
    assert "answer" in tty.getvalue() and "4/10" in tty.getvalue()
    pipe = io.StringIO()  # not a terminal: never drawn
    with Progress("loading", stream=pipe, delay_s=0.0):
        time.sleep(0.3)
    assert pipe.getvalue() == ""
