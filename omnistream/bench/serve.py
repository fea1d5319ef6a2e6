"""`omnistream bench serve`: the server under load on loopback, against the same requests
served in-process, in one run.

1. Workload: --requests chat completions (--clients N closed-loop streaming clients, each
   sending its share back to back, or --rate R: Poisson arrivals, open loop), mixed by --mix
   (kind=weight, comma separated): `text` (a seeded prompt of ~--prompt-tokens tokens), `image`
   (a seeded --size x --size PNG + a question), `video` (a seeded --video-frames clip at 2 fps,
   encoded as mp4, + a question). Every request has its own prompt and media, kept at --size
   (min = max pixels), and asks for exactly --new-tokens tokens (greedy, ignore_eos).
2. HTTP: `omnistream serve` in a subprocess on 127.0.0.1 (port 0; the URL comes from its startup
   line) on the same model and engine options; the requests go through httpx as OpenAI
   streaming chat completions (SSE, stream_options.include_usage), media as data URLs.
3. In-process: the server exits, then the same model is built here (same seeded weights) and
   the same requests, in the same schedule, go to engine.submit directly (media decoded in a
   thread, as the server does), read through the handle's async iterator.

Each phase starts with an untimed warm-up (up to 8 concurrent requests, every kind). Per phase: output
tokens/s (all tokens / wall time from the first send to the last end), TTFT (send -> first text
chunk), inter-chunk latency and end-to-end latency p50/p90/p99, errors by HTTP status (or
exception type); then the HTTP overhead (TTFT p50 difference, p99 ratio, tokens/s ratio) against
the targets, and how many greedy answers are equal in both phases.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import queue
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from omnistream.bench.concurrency import context_words, mean, pct
from omnistream.bench.workload import synthetic_video_frames
from omnistream.server.config import ServerConfig

KINDS = ("text", "image", "video")  # session follow-ups and live streams: not served yet
QUESTIONS = {"text": "Summarise my notes in one sentence.", "image": "Describe this image.", "video": "What happens in this video?"}
# for 3B on an H200 with 32 streaming clients (issue 9)
TARGET_TTFT_P50_DELTA_S, TARGET_TTFT_P99_RATIO, TARGET_TPS_RATIO = 0.003, 1.2, 0.9
VIDEO_FPS = 2.0
WARMUP_MAX = 8  # concurrent untimed requests before each phase
SERVER_START_TIMEOUT_S = 900.0  # a 7B random model on a GPU, CUDA graphs captured


# ---------------------------------------------------------------------------------- workload
def parse_mix(text: str) -> dict[str, float]:
    """'text=2,image=1,video=1' (or 'text,image') -> {kind: weight}."""
    mix = {}
    for item in str(text).split(","):
        kind, _, weight = item.strip().partition("=")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            w = -1.0
        if kind not in KINDS or not w >= 0:
            raise SystemExit(f"error: --mix items are KIND[=WEIGHT] with KIND one of {', '.join(KINDS)}, got {item!r}")
        mix[kind] = w
    if not sum(mix.values()) > 0:
        raise SystemExit("error: --mix needs one kind of positive weight")
    return mix


@dataclass
class Spec:
    """One request of the workload, in both forms."""

    index: int
    kind: str
    openai_messages: list[dict]  # what the HTTP client sends
    engine_messages: list[dict]  # the same conversation for Engine.request_for


@dataclass
class Workload:
    specs: list[Spec]
    warmup: list[Spec]
    offsets: list[float] | None  # Poisson arrival times (s after the start); None: closed loop
    clients: int
    media_dir: tempfile.TemporaryDirectory = field(repr=False)


def _png(frame: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return buf.getvalue()


def write_clip(path: Path, frames: list[np.ndarray], fps: float) -> Path:
    """Frames -> an h264 mp4 (the bench's own seeded content, unlike the fixed sample video)."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=int(fps), options={"threads": "1"})
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode(None))
    return path


def _data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def make_spec(index: int, kind: str, tokenizer, opts: dict, media_dir: Path, seed: int) -> Spec:
    if kind == "text":
        text = f"Here are my notes:\n{context_words(tokenizer, opts['prompt_tokens'], seed)}\n{QUESTIONS['text']}"
        return Spec(index, kind, [{"role": "user", "content": text}], [{"role": "user", "content": text}])
    size = opts["size"]
    pixels = {"min_pixels": size * size, "max_pixels": size * size}  # kept at --size: known token counts
    if kind == "image":
        data = _png(synthetic_video_frames(1, size, seed)[0])
        path = media_dir / f"{index}.png"
        path.write_bytes(data)
        http_part = {"type": "image_url", "image_url": {"url": _data_url("image/png", data), **pixels}}
        engine_part = {"type": "image", "image": str(path), **pixels}
    else:
        path = write_clip(media_dir / f"{index}.mp4", synthetic_video_frames(opts["video_frames"], size, seed), VIDEO_FPS)
        http_part = {"type": "video_url", "video_url": {"url": _data_url("video/mp4", path.read_bytes()), "fps": VIDEO_FPS, **pixels}}
        engine_part = {"type": "video", "video": str(path), "fps": VIDEO_FPS, **pixels}
    question = {"type": "text", "text": QUESTIONS[kind]}
    return Spec(index, kind, [{"role": "user", "content": [http_part, question]}], [{"role": "user", "content": [engine_part, question]}])


def make_workload(tokenizer, mix: dict[str, float], n: int, clients: int, rate: float | None, opts: dict, seed: int) -> Workload:
    rng = np.random.default_rng(seed)
    kinds = list(mix)
    weights = np.asarray([mix[k] for k in kinds]) / sum(mix.values())
    chosen = rng.choice(len(kinds), size=n, p=weights)
    media = tempfile.TemporaryDirectory(prefix="omnistream-bench-serve-")
    root = Path(media.name)
    specs = [make_spec(i, kinds[k], tokenizer, opts, root, seed + 1 + i) for i, k in enumerate(chosen)]
    live = [k for k in kinds if mix[k] > 0]
    n_warm = max(len(live), min(clients, WARMUP_MAX))  # every kind, and a batch of concurrent streams
    warmup = [make_spec(n + j, live[j % len(live)], tokenizer, opts, root, seed + 100_000 + j) for j in range(n_warm)]
    offsets = None
    if rate:
        gaps = rng.exponential(1.0 / rate, n)
        offsets = np.concatenate([[0.0], np.cumsum(gaps[1:])]).tolist()
    return Workload(specs, warmup, offsets, clients, media)


# ---------------------------------------------------------------------------------- one request
@dataclass
class Sample:
    """One request as its client saw it (perf_counter seconds)."""

    index: int
    kind: str
    sent: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # each chunk that carried text
    ended: float | None = None
    text: str = ""
    output_tokens: int = 0
    error: str | None = None  # HTTP status ("503") or exception type; None: ok

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times[0] - self.sent if self.chunk_times else None

    @property
    def e2e_s(self) -> float | None:
        return None if self.ended is None or self.error else self.ended - self.sent


async def http_request(client, model: str, spec: Spec, max_tokens: int) -> Sample:
    payload = {"model": model, "messages": spec.openai_messages, "max_tokens": max_tokens, "temperature": 0,
               "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    s = Sample(spec.index, spec.kind, sent=time.perf_counter())
    try:
        async with client.stream("POST", "/v1/chat/completions", json=payload) as r:
            if r.status_code != 200:
                await r.aread()
                s.error = str(r.status_code)
                return s
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                _take_chunk(s, json.loads(data))
    except Exception as e:  # noqa: BLE001 - counted, the run goes on
        s.error = type(e).__name__
    s.ended = time.perf_counter()
    return s


def _take_chunk(s: Sample, chunk: dict) -> None:
    usage = chunk.get("usage")
    if usage:
        s.output_tokens = usage.get("completion_tokens", 0)
    for choice in chunk.get("choices") or []:
        content = (choice.get("delta") or {}).get("content")
        if content:
            s.chunk_times.append(time.perf_counter())
            s.text += content


async def engine_request(engine, pool: ThreadPoolExecutor, spec: Spec, sampling) -> Sample:
    s = Sample(spec.index, spec.kind, sent=time.perf_counter())
    try:
        loop = asyncio.get_running_loop()
        request = await loop.run_in_executor(pool, engine.request_for, spec.engine_messages, sampling)
        handle = engine.submit(request)
        async for delta in handle:
            if delta.text:
                s.chunk_times.append(time.perf_counter())
                s.text += delta.text
        s.output_tokens = len(handle.result().token_ids)
    except Exception as e:  # noqa: BLE001
        s.error = type(e).__name__
    s.ended = time.perf_counter()
    return s


# ---------------------------------------------------------------------------------- schedules
async def run_schedule(send, w: Workload) -> tuple[list[Sample], float, float]:
    """send(spec) -> Sample, over the workload's schedule -> (samples in spec order, start, end)."""
    await asyncio.gather(*(send(spec) for spec in w.warmup))  # untimed: first kernels, media paths, batching
    start = time.perf_counter()
    if w.offsets is None:
        async def client(c: int) -> list[Sample]:
            return [await send(spec) for spec in w.specs[c::w.clients]]

        per_client = await asyncio.gather(*(client(c) for c in range(w.clients)))
        samples = sorted((s for group in per_client for s in group), key=lambda s: s.index)
    else:
        async def arrive(spec: Spec, offset: float) -> Sample:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            return await send(spec)

        samples = list(await asyncio.gather(*(arrive(sp, off) for sp, off in zip(w.specs, w.offsets))))
    return samples, start, time.perf_counter()


async def http_phase(url: str, model: str, w: Workload, max_tokens: int) -> tuple[list[Sample], float, float]:
    import httpx

    limits = httpx.Limits(max_connections=len(w.specs) + 8, max_keepalive_connections=len(w.specs) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        return await run_schedule(lambda spec: http_request(client, model, spec, max_tokens), w)


async def engine_phase(engine, w: Workload, sampling) -> tuple[list[Sample], float, float]:
    # as many media decodes at once as the server runs (ServerConfig.media_decode_threads): the same work, the same way
    with ThreadPoolExecutor(max_workers=ServerConfig().media_decode_threads, thread_name_prefix="bench-media") as pool:
        return await run_schedule(lambda spec: engine_request(engine, pool, spec, sampling), w)


# ---------------------------------------------------------------------------------- server
class ServerProcess:
    """`python -m omnistream serve ... --port 0` in a subprocess; its URL from the startup line."""

    def __init__(self, argv: list[str], timeout_s: float = SERVER_START_TIMEOUT_S) -> None:
        from omnistream.entrypoints.serve_cli import parse_startup_line

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


# ---------------------------------------------------------------------------------- statistics
def _percentiles(prefix: str, xs: list[float]) -> dict[str, float | None]:
    return {f"{prefix}_p{q}_s": pct(xs, q) for q in (50, 90, 99)}


def summarize(samples: list[Sample], start: float, end: float) -> dict[str, Any]:
    ok = [s for s in samples if s.error is None]
    ended = max((s.ended for s in ok), default=end)
    wall = ended - start
    tokens = sum(s.output_tokens for s in ok)
    itl = [b - a for s in ok for a, b in zip(s.chunk_times, s.chunk_times[1:])]
    by_kind = {}
    for kind in sorted({s.kind for s in samples}):
        mine = [s for s in ok if s.kind == kind]
        by_kind[kind] = {"requests": sum(s.kind == kind for s in samples), "ok": len(mine),
                         "ttft_p50_s": pct([s.ttft_s for s in mine], 50), "e2e_p50_s": pct([s.e2e_s for s in mine], 50),
                         "mean_output_tokens": mean([s.output_tokens for s in mine])}
    return {
        "requests": len(samples), "ok": len(ok), "errors": dict(Counter(s.error for s in samples if s.error)),
        "output_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else None,
        **_percentiles("ttft", [s.ttft_s for s in ok]), **_percentiles("itl", itl), **_percentiles("e2e", [s.e2e_s for s in ok]),
        "itl_samples": len(itl), "by_kind": by_kind,
    }


def _ratio(a, b):
    return a / b if a is not None and b else None


def overhead(http: dict, local: dict) -> dict[str, Any]:
    """HTTP against in-process: differences of medians, ratios of tails and of throughput."""
    delta = lambda k: None if http[k] is None or local[k] is None else http[k] - local[k]  # noqa: E731
    return {
        "ttft_p50_delta_s": delta("ttft_p50_s"), "ttft_p99_ratio": _ratio(http["ttft_p99_s"], local["ttft_p99_s"]),
        "itl_p50_delta_s": delta("itl_p50_s"), "itl_p99_ratio": _ratio(http["itl_p99_s"], local["itl_p99_s"]),
        "e2e_p50_delta_s": delta("e2e_p50_s"), "e2e_p99_ratio": _ratio(http["e2e_p99_s"], local["e2e_p99_s"]),
        "tokens_per_s_ratio": _ratio(http["tokens_per_s"], local["tokens_per_s"]),
    }


def check_targets(o: dict) -> list[dict]:
    rows = [("TTFT p50 within 3 ms of in-process", "ttft_p50_delta_s", "<=", TARGET_TTFT_P50_DELTA_S),
            ("TTFT p99 within 1.2x of in-process", "ttft_p99_ratio", "<=", TARGET_TTFT_P99_RATIO),
            ("tokens/s within 10% of in-process", "tokens_per_s_ratio", ">=", TARGET_TPS_RATIO)]
    out = []
    for label, key, op, bound in rows:
        v = o[key]
        out.append({"target": label, "metric": key, "value": v, "bound": bound,
                    "ok": None if v is None else (v <= bound if op == "<=" else v >= bound)})
    return out


def equal_answers(http: list[Sample], local: list[Sample]) -> dict[str, int]:
    pairs = [(a, b) for a, b in zip(http, local) if a.error is None and b.error is None]
    return {"compared": len(pairs), "equal": sum(a.text == b.text for a, b in pairs)}


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

    opts = {"prompt_tokens": cfg.prompt_tokens, "size": cfg.size, "video_frames": cfg.video_frames}
    w = make_workload(_tokenizer_for(cfg.model), dict(cfg.mix), cfg.requests, cfg.clients, cfg.rate, opts, cfg.seed)
    try:
        log(f"server: omnistream serve {' '.join(server_argv(cfg))}")
        server = ServerProcess(server_argv(cfg))
        log(f"  {server.startup_line} ({server.startup_s:.1f} s)")
        try:
            http_samples, h0, h1 = asyncio.run(http_phase(server.url, SERVED_NAME, w, cfg.new_tokens))
        finally:
            exit_code = server.stop()
        log(f"  HTTP phase done; server exited {exit_code}")
        engine = make_engine(cfg.model, cfg.device, cfg.dtype, cfg.seed, **dict(cfg.engine_options))
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
                     "engine_options": dict(cfg.engine_options)},
        "server": {"startup_line": server.startup_line, "startup_s": server.startup_s, "exit_code": exit_code,
                   "stderr_tail": "".join(server.stderr[-20:])},
        "http": http, "in_process": local, "overhead": o, "targets": check_targets(o),
        "answers": equal_answers(http_samples, local_samples),
        "in_process_engine_stats_after": engine_stats,
    }


# ---------------------------------------------------------------------------------- output
def _f(x, scale: float = 1.0, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x * scale:,.{digits}f}"


def _mark(ok) -> str:
    return "n/a" if ok is None else ("ok" if ok else "MISSED")


def print_report(r: dict, out=None) -> None:
    p = lambda *a: print(*a, file=out)  # noqa: E731
    env, w = r["env"], r["workload"]
    where = env["gpu"] or f"CPU ({env['cpu']})"
    load = f"Poisson arrivals at {w['rate']} requests/s" if w["rate"] else f"{w['clients']} concurrent streaming clients"
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(w["kinds"].items()))
    p(f"omnistream bench serve: {w['model']} {env['dtype']} on {where}; torch {env['torch']}")
    p(f"workload: {w['requests']} chat completions ({kinds}), {load}; {w['new_tokens']} new tokens max (greedy); "
      f"text ~{w['prompt_tokens']} prompt tokens; images {w['size']}x{w['size']}; videos {w['video_frames']} frames {w['size']}x{w['size']}")
    p(f"server: {r['server']['startup_line']}")
    p("")
    p(f"{'':<12}{'ok':>5}{'errors':>10}{'tok/s':>10}{'TTFT p50':>10}{'p90':>8}{'p99 ms':>8}{'ITL p50':>9}{'p90':>7}{'p99 ms':>8}"
      f"{'E2E p50':>9}{'p90':>8}{'p99 ms':>8}")
    for name, key in (("HTTP (SSE)", "http"), ("in-process", "in_process")):
        s = r[key]
        errors = ",".join(f"{k}:{v}" for k, v in sorted(s["errors"].items())) or "0"
        p(f"{name:<12}{s['ok']:>5}{errors:>10}{_f(s['tokens_per_s'], digits=0):>10}"
          f"{_f(s['ttft_p50_s'], 1000):>10}{_f(s['ttft_p90_s'], 1000):>8}{_f(s['ttft_p99_s'], 1000):>8}"
          f"{_f(s['itl_p50_s'], 1000, 2):>9}{_f(s['itl_p90_s'], 1000, 2):>7}{_f(s['itl_p99_s'], 1000, 2):>8}"
          f"{_f(s['e2e_p50_s'], 1000):>9}{_f(s['e2e_p90_s'], 1000):>8}{_f(s['e2e_p99_s'], 1000):>8}")
    p("")
    for kind, k in r["http"]["by_kind"].items():
        lk = r["in_process"]["by_kind"].get(kind, {})
        p(f"  {kind:<6} {k['requests']:>4} requests: TTFT p50 {_f(k['ttft_p50_s'], 1000)} ms over HTTP, "
          f"{_f(lk.get('ttft_p50_s'), 1000)} ms in-process; E2E p50 {_f(k['e2e_p50_s'], 1000)} / {_f(lk.get('e2e_p50_s'), 1000)} ms")
    o, a = r["overhead"], r["answers"]
    p(f"HTTP overhead: TTFT p50 {_f(o['ttft_p50_delta_s'], 1000, 2)} ms, p99 {_f(o['ttft_p99_ratio'], digits=3)}x; "
      f"ITL p50 {_f(o['itl_p50_delta_s'], 1000, 2)} ms, p99 {_f(o['itl_p99_ratio'], digits=3)}x; "
      f"E2E p50 {_f(o['e2e_p50_delta_s'], 1000, 2)} ms, p99 {_f(o['e2e_p99_ratio'], digits=3)}x; tokens/s {_f(o['tokens_per_s_ratio'], digits=3)}x")
    p(f"greedy answers equal over HTTP and in-process: {a['equal']}/{a['compared']}")
    note = "" if (str(w["model"]) == "3b" and env["gpu"]) else f" (set for 3B on an H200, 32 clients; this run: {w['model']} on {env['gpu'] or 'CPU'}, indicative only)"
    p(f"targets{note}:")
    for t in r["targets"]:
        scale, unit, digits = (1000, " ms", 2) if t["metric"].endswith("_s") else (1, "x", 3)
        p(f"  {t['target']:<40} {_f(t['value'], scale, digits) + unit:>12}  {_mark(t['ok'])}")


def cmd_bench_serve(args) -> int:
    from omnistream.bench.multiturn import model_arg, write_json
    from omnistream.entrypoints.cli import _default_device
    from omnistream.entrypoints.options import engine_options

    if args.rate is not None and not args.rate > 0:
        raise SystemExit("error: --rate must be > 0 (requests/s)")
    device = _default_device(args.device)
    engine_opts = {"max_num_seqs": max(64, args.clients)} | engine_options(args)
    cfg = BenchServeConfig(model=model_arg(args), device=device, dtype=args.dtype, clients=args.clients,
                           requests=args.requests or args.clients * 4, rate=args.rate, mix=tuple(parse_mix(args.mix).items()),
                           new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens, size=args.size,
                           video_frames=args.video_frames, seed=args.seed, engine_options=tuple(engine_opts.items()),
                           serve_args=tuple(shlex.split(args.serve_args)))
    report = run_bench_serve(cfg)
    print_report(report)
    write_json(report, args.json)
    return 0
