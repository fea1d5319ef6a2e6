"""`omnistream bench serve`: the server under load on loopback, against the same requests
served in-process, in one run.

1. Workload: --requests work items (--clients N closed-loop clients, each running its share back
   to back, or --rate R: Poisson arrivals of the items, open loop), mixed by --mix (kind=weight,
   comma separated):
     `text`   a chat completion: a seeded prompt of ~--prompt-tokens tokens;
     `image`  a chat completion: a seeded --size x --size PNG + a question;
     `video`  a chat completion: a seeded --video-frames clip at 2 fps, encoded as mp4, + a question;
     `session` a pinned session (POST /v1/sessions, its image added through /v1/sessions/{id}/media),
              then --session-turns questions, each a streaming chat completion with X-Session-Id
              (timed one by one: the first as `session`, the others as `session_followup`, which
              are served from the session's pinned KV and should take a few ms to first token);
     `live`   a /v1/realtime socket: --live-frames JPEG frames sent at --live-fps
              (input_image_buffer.append with timestamp_ms) and --live-questions questions, one
              after each share of the frames (conversation.item.create + response.create; the
              next share of frames is sent while the answer streams). Each question is timed:
              TTFT from response.create to the first response.output_text.delta, ITL between
              deltas, E2E to response.done.
   Media is seeded per item and kept at --size (min = max pixels); chat completions and session
   turns ask for exactly --new-tokens tokens (greedy, ignore_eos); live answers at most that many
   (greedy: the realtime API has no ignore_eos).
2. HTTP: `omnistream serve` in a subprocess on 127.0.0.1 (port 0; the URL comes from its startup
   line) on the same model and engine options; chat completions through aiohttp as OpenAI
   streaming chat completions (SSE, stream_options.include_usage), media as data URLs; live
   streams through the `websockets` client.
3. In-process: the server exits, then the same model is built here (same seeded weights, the
   server's engine options: its engine core in its own process unless --no-engine-process) and
   the same work, in the same schedule, goes to the engine directly: chat completions to
   engine.submit (media decoded in a thread, as the server does), sessions through
   engine.session() + Session.start, live streams through engine.live_session() (each frame's
   JPEG decoded in a thread, then add_frame; LiveSession.start per question); answers read
   through the handles' async iterators.

Each phase starts with an untimed warm-up (up to 8 concurrent items, every kind). Per phase: output
tokens/s (all tokens / wall time from the first send to the last end), TTFT (send -> first text
chunk), inter-chunk latency and end-to-end latency p50/p90/p99, errors by HTTP status (or
exception type, or realtime error code), the same per kind; then the HTTP overhead (TTFT p50
difference, p99 ratio, tokens/s ratio) against the targets, and how many greedy answers are
equal in both phases. Compared where the answer is exact: chat completions and session turns
always; live answers under the `exact` policy (the server answers each question over exactly
the frames sent before its response.create, and LiveSession.start waits for the frames added
before it: the same frames either way); under `fast` they depend on when the KV edits ran and
are not compared.

Files: the work items, their Samples and the schedule (serve_workload.py), the HTTP phase
(serve_http.py), the in-process phase (serve_local.py), the statistics and targets
(serve_stats.py); here the server process, the driver and the report.
"""


from __future__ import annotations

import asyncio
import os
import queue
import shlex
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omnistream.bench.concurrency import fmt_num, target_mark
from omnistream.bench.serve_http import http_phase
from omnistream.bench.serve_local import engine_phase
from omnistream.bench.serve_stats import check_targets, equal_answers, kind_order, overhead, summarize
from omnistream.bench.serve_workload import Sample, make_workload, parse_mix
from omnistream.entrypoints.serving import SERVER_ENGINE_DEFAULTS


SERVER_START_TIMEOUT_S = 900.0  # a 7B random model on a GPU, CUDA graphs captured


# ---------------------------------------------------------------------------------- server
class ServerProcess:
    """`python -m omnistream serve ... --port 0` in a subprocess; its URL from the startup line."""

    def __init__(self, argv: list[str], timeout_s: float = SERVER_START_TIMEOUT_S) -> None:
        from omnistream.entrypoints.serving import parse_startup_line

        t0 = time.perf_counter()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "omnistream", "serve", *argv], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.stderr: list[str] = []
        self.stdout: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._drain, args=(self.proc.stderr, self.stderr.append), daemon=True).start()
        threading.Thread(target=self._drain, args=(self.proc.stdout, self.stdout.put, True), daemon=True).start()
        self.url = self.startup_line = None
        deadline = time.monotonic() + timeout_s
        while self.url is None and time.monotonic() < deadline:  # printed once the engine is built
            try:
                line = self.stdout.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:  # the server exited
                break
            self.url, self.startup_line = parse_startup_line(line), line.strip()
        if self.url is None:
            self.stop()
            raise RuntimeError(f"omnistream serve did not start (exit {self.proc.returncode}):\n" + "".join(self.stderr[-30:]))
        self.startup_s = time.perf_counter() - t0

    @staticmethod
    def _drain(stream, put, mark_end: bool = False) -> None:
        for line in stream:
            put(line)
        if mark_end:
            put(None)  # EOF: the server exited

    def stop(self) -> int:
        """Ctrl-C, as a user would; killed if it does not exit within a minute."""
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# ---------------------------------------------------------------------------------- driver
SERVED_NAME = "omnistream-bench"


@dataclass(frozen=True)
class BenchServeConfig:
    model: str  # a preset (random weights, seeded) or a checkpoint directory
    device: str
    dtype: str = "auto"
    clients: int = 8  # concurrent closed-loop clients (ignored with rate)
    requests: int = 32
    rate: float | None = None  # Poisson arrivals, requests/s (open loop)
    mix: tuple[tuple[str, float], ...] = (("text", 2.0), ("image", 1.0), ("video", 1.0))
    new_tokens: int = 64
    prompt_tokens: int = 256
    size: int = 448
    video_frames: int = 8
    session_turns: int = 3  # questions per session (the first, then follow-ups)
    live_frames: int = 16  # frames per live stream
    live_fps: float = 4.0
    live_questions: int = 2
    live_policy: str = "exact"
    seed: int = 0
    engine_options: tuple[tuple[str, Any], ...] = ()
    serve_args: tuple[str, ...] = ()  # more flags for the server (e.g. --replicas 2 --replica-gpus 0.5)


def _tokenizer_for(model: str):
    from omnistream.bench.models import is_preset
    from omnistream.models.demo import ensure_demo_model
    from omnistream.models.tokenizer import Tokenizer

    return Tokenizer(ensure_demo_model() if is_preset(model) else Path(model))


def server_argv(cfg: BenchServeConfig) -> list[str]:
    from omnistream.bench.models import is_preset
    from omnistream.entrypoints.options import to_flags

    model = ["--model-config", cfg.model, "--weights-seed", str(cfg.seed)] if is_preset(cfg.model) else ["--model", cfg.model]
    return [*model, "--device", cfg.device, "--dtype", cfg.dtype, "--host", "127.0.0.1", "--port", "0",
            "--served-model-name", SERVED_NAME, *to_flags(dict(cfg.engine_options)), *cfg.serve_args]


def run_bench_serve(cfg: BenchServeConfig, log=print) -> dict[str, Any]:
    import torch

    from omnistream.bench.latency import environment
    from omnistream.bench.models import make_engine, resolve_dtype
    from omnistream.engine.sampling import SamplingParams

    opts = {"prompt_tokens": cfg.prompt_tokens, "size": cfg.size, "video_frames": cfg.video_frames,
            "session_turns": cfg.session_turns, "live_frames": cfg.live_frames, "live_fps": cfg.live_fps,
            "live_questions": cfg.live_questions, "live_policy": cfg.live_policy}
    w = make_workload(_tokenizer_for(cfg.model), dict(cfg.mix), cfg.requests, cfg.clients, cfg.rate, opts, cfg.seed)
    try:
        log(f"server: omnistream serve {' '.join(server_argv(cfg))}")
        server = ServerProcess(server_argv(cfg))
        log(f"  {server.startup_line} ({server.startup_s:.1f} s)")
        try:
            http_samples, h0, h1 = asyncio.run(http_phase(server.url, SERVED_NAME, w, cfg.new_tokens))
        finally:
            exit_code = server.stop()
        log(f"  HTTP phase done; server stopped (exit {exit_code}{': SIGINT, as sent' if exit_code == 130 else ''})")
        # the reference runs the engine as the server did (serve's defaults, then the options):
        # with its engine in a thread, the reference shared its interpreter with 16 media
        # threads and its text questions queued 57-82 ms in the engine against 8-12 ms over HTTP
        # (H200, session 6), which the report counted as the server's gain
        local_options = {**SERVER_ENGINE_DEFAULTS, **dict(cfg.engine_options)}
        engine = make_engine(cfg.model, cfg.device, cfg.dtype, cfg.seed, **local_options)
        try:
            sampling = SamplingParams(max_new_tokens=cfg.new_tokens, ignore_eos=True)  # the HTTP requests' ignore_eos
            local_samples, l0, l1 = asyncio.run(engine_phase(engine, w, sampling))
            engine_stats = engine.stats()
        finally:
            engine.close()
        log("  in-process phase done")
    finally:
        w.media_dir.cleanup()
    http, local = summarize(http_samples, h0, h1), summarize(local_samples, l0, l1)
    o = overhead(http, local)
    dev = torch.device(cfg.device)
    return {
        "env": environment(dev, resolve_dtype(cfg.dtype, cfg.device)),
        "workload": {"model": cfg.model, "clients": None if cfg.rate else cfg.clients, "rate": cfg.rate, "requests": cfg.requests,
                     "mix": dict(cfg.mix), "kinds": dict(Counter(s.kind for s in w.specs)), "new_tokens": cfg.new_tokens,
                     "prompt_tokens": cfg.prompt_tokens, "size": cfg.size, "video_frames": cfg.video_frames, "seed": cfg.seed,
                     "session_turns": cfg.session_turns, "live_frames": cfg.live_frames, "live_fps": cfg.live_fps,
                     "live_questions": cfg.live_questions, "live_policy": cfg.live_policy,
                     "engine_options": dict(cfg.engine_options)},
        "server": {"startup_line": server.startup_line, "startup_s": server.startup_s, "exit_code": exit_code,
                   "stderr_tail": "".join(server.stderr[-20:]),
                   # a traceback (the engine process's own, say) is not lost behind the access log
                   "stderr_problems": "".join(line for line in server.stderr if "omnistream.server.access" not in line)[-20000:]},
        "http": http, "in_process": local, "overhead": o, "targets": check_targets(o),
        "answers": equal_answers(http_samples, local_samples),
        "in_process_engine_stats_after": engine_stats,
        "samples": {"http": [sample_record(x, h0) for x in http_samples], "in_process": [sample_record(x, l0) for x in local_samples]},
    }


def sample_record(s: Sample, start: float) -> dict[str, Any]:
    """One timed request for the JSON file: when it was sent (s after the phase began), its
    latencies, tokens, error, and the engine's own timings of it."""
    return {"item": s.index, "kind": s.kind, "turn": s.turn, "sent_s": s.sent - start if s.sent else None,
            "ttft_s": s.ttft_s, "e2e_s": s.e2e_s, "chunks": len(s.chunk_times), "output_tokens": s.output_tokens,
            "cached_tokens": s.cached_tokens, "error": s.error, "engine": s.server}


# ---------------------------------------------------------------------------------- output
def _errors(errors: dict) -> str:
    return ",".join(f"{k}:{v}" for k, v in sorted(errors.items())) or "0"


def _workload_line(w: dict, load: str) -> str:
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(w["kinds"].items(), key=lambda kv: kind_order(kv[0])))
    parts = [f"workload: {w['requests']} items ({kinds}), {load}; {w['new_tokens']} new tokens max (greedy)"]
    if "text" in w["kinds"]:
        parts.append(f"text ~{w['prompt_tokens']} prompt tokens")
    if {"image", "session"} & set(w["kinds"]):
        parts.append(f"images {w['size']}x{w['size']}")
    if "video" in w["kinds"]:
        parts.append(f"videos {w['video_frames']} frames {w['size']}x{w['size']}")
    if "session" in w["kinds"]:
        parts.append(f"sessions: an image + {w['session_turns']} questions")
    if "live" in w["kinds"]:
        parts.append(f"live: {w['live_frames']} JPEG frames {w['size']}x{w['size']} at {w['live_fps']:g} fps, "
                     f"{w['live_questions']} questions, policy {w['live_policy']}")
    return "; ".join(parts)


def print_report(r: dict, out=None) -> None:
    p = lambda *a: print(*a, file=out)  # noqa: E731
    env, w = r["env"], r["workload"]
    where = env["gpu"] or f"CPU ({env['cpu']})"
    load = f"Poisson arrivals at {w['rate']} items/s" if w["rate"] else f"{w['clients']} concurrent streaming clients"
    p(f"omnistream bench serve: {w['model']} {env['dtype']} on {where}; torch {env['torch']}")
    p(_workload_line(w, load))
    p(f"server: {r['server']['startup_line']}")
    p("")
    p(f"{'':<12}{'ok':>5}{'errors':>10}{'tok/s':>10}{'TTFT p50':>10}{'p90':>8}{'p99 ms':>8}{'ITL p50':>9}{'p90':>7}{'p99 ms':>8}"
      f"{'E2E p50':>9}{'p90':>8}{'p99 ms':>8}")
    for name, key in (("HTTP (SSE)", "http"), ("in-process", "in_process")):
        s = r[key]
        p(f"{name:<12}{s['ok']:>5}{_errors(s['errors']):>10}{fmt_num(s['tokens_per_s'], digits=0):>10}"
          f"{fmt_num(s['ttft_p50_s'], 1000):>10}{fmt_num(s['ttft_p90_s'], 1000):>8}{fmt_num(s['ttft_p99_s'], 1000):>8}"
          f"{fmt_num(s['itl_p50_s'], 1000, 2):>9}{fmt_num(s['itl_p90_s'], 1000, 2):>7}{fmt_num(s['itl_p99_s'], 1000, 2):>8}"
          f"{fmt_num(s['e2e_p50_s'], 1000):>9}{fmt_num(s['e2e_p90_s'], 1000):>8}{fmt_num(s['e2e_p99_s'], 1000):>8}")
    p("")
    p(f"  {'per kind (HTTP / in-process)':<30}{'requests':>9}{'errors':>14}{'TTFT p50 ms':>18}{'TTFT p99 ms':>18}"
      f"{'ITL p50 ms':>16}{'E2E p50 ms':>18}{'cached tok':>14}{'answers equal':>15}")
    for kind, k in r["http"]["by_kind"].items():
        lk = r["in_process"]["by_kind"].get(kind, {})
        a = r["answers"].get("by_kind", {}).get(kind)
        eq = "n/a" if a is None else (f"{a['equal']}/{a['compared']}" + (f" (+{a['not_compared']} timing-dep.)" if a["not_compared"] else ""))
        both = lambda key, scale=1000, digits=1: f"{fmt_num(k.get(key), scale, digits)} / {fmt_num(lk.get(key), scale, digits)}"  # noqa: E731
        p(f"  {kind:<30}{k['requests']:>9}{_errors(k['errors']) + ' / ' + _errors(lk.get('errors', {})):>14}"
          f"{both('ttft_p50_s'):>18}{both('ttft_p99_s'):>18}{both('itl_p50_s', digits=2):>16}{both('e2e_p50_s'):>18}{both('mean_cached_tokens', 1, 0):>14}{eq:>15}")
    p("")
    p(f"  {'TTFT p50 split (HTTP / in-process)':<36}{'in engine ms':>18}{'media ms':>18}{'queued ms':>18}{'outside ms':>18}"
      f"{'to server':>11}{'server receive':>16}{'server send':>13}{'to client':>11}")
    rows = [("all", r["http"], r["in_process"])]
    rows += [(kind, k, r["in_process"]["by_kind"].get(kind, {})) for kind, k in r["http"]["by_kind"].items()]
    for name, h, lk in rows:
        both = lambda key: f"{fmt_num(h.get(key), 1000, 1)} / {fmt_num(lk.get(key), 1000, 1)}"  # noqa: E731
        p(f"  {name:<36}{both('engine_ttft_p50_s'):>18}{both('media_p50_s'):>18}{both('queue_p50_s'):>18}{both('outside_p50_s'):>18}"
          f"{fmt_num(h.get('to_server_p50_s'), 1000, 1):>11}{fmt_num(h.get('receive_p50_s'), 1000, 1):>16}"
          f"{fmt_num(h.get('send_p50_s'), 1000, 1):>13}{fmt_num(h.get('to_client_p50_s'), 1000, 1):>11}")
    o, a = r["overhead"], r["answers"]
    p(f"HTTP overhead: TTFT p50 {fmt_num(o['ttft_p50_delta_s'], 1000, 2)} ms, p99 {fmt_num(o['ttft_p99_ratio'], digits=3)}x; "
      f"ITL p50 {fmt_num(o['itl_p50_delta_s'], 1000, 2)} ms, p99 {fmt_num(o['itl_p99_ratio'], digits=3)}x; "
      f"E2E p50 {fmt_num(o['e2e_p50_delta_s'], 1000, 2)} ms, p99 {fmt_num(o['e2e_p99_ratio'], digits=3)}x; tokens/s {fmt_num(o['tokens_per_s_ratio'], digits=3)}x")
    p(f"HTTP's own share of TTFT (time outside the engine, p50, HTTP minus in-process): {fmt_num(o.get('outside_p50_delta_s'), 1000, 2)} ms")
    extra = f" ({a['not_compared']} live `fast` answers not compared: timing-dependent)" if a.get("not_compared") else ""
    p(f"greedy answers equal over HTTP and in-process: {a['equal']}/{a['compared']}{extra}")
    note = "" if (str(w["model"]) == "3b" and env["gpu"]) else f" (set for 3B on an H200, 32 clients; this run: {w['model']} on {env['gpu'] or 'CPU'}, indicative only)"
    p(f"targets{note}:")
    for t in r["targets"]:
        scale, unit, digits = (1000, " ms", 2) if t["metric"].endswith("_s") else (1, "x", 3)
        p(f"  {t['target']:<40} {fmt_num(t['value'], scale, digits) + unit:>12}  {target_mark(t['ok'])}")


def cmd_bench_serve(args) -> int:
    from omnistream.bench.multiturn import model_arg, write_json
    from omnistream.entrypoints.options import default_device
    from omnistream.entrypoints.options import engine_options

    if args.rate is not None and not args.rate > 0:
        raise SystemExit("error: --rate must be > 0 (items/s)")
    if not args.live_fps > 0:
        raise SystemExit("error: --live-fps must be > 0")
    device = default_device(args.device)
    engine_opts = {"max_num_seqs": max(64, args.clients)} | engine_options(args)
    cfg = BenchServeConfig(model=model_arg(args), device=device, dtype=args.dtype, clients=args.clients,
                           requests=args.requests or args.clients * 4, rate=args.rate, mix=tuple(parse_mix(args.mix).items()),
                           new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens, size=args.size,
                           video_frames=args.video_frames, session_turns=args.session_turns, live_frames=args.live_frames,
                           live_fps=args.live_fps, live_questions=min(args.live_questions, args.live_frames),
                           live_policy=args.live_policy, seed=args.seed, engine_options=tuple(engine_opts.items()),
                           serve_args=tuple(shlex.split(args.serve_args)))
    report = run_bench_serve(cfg)
    print_report(report)
    write_json(report, args.json)
    return 0
