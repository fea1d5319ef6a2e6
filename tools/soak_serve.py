"""Loopback soak of `omnistream serve` on the CPU with the demo model (issue 9's acceptance).

    python tools/soak_serve.py --minutes 10          # the acceptance run
    python tools/soak_serve.py --minutes 1           # a quick one

The app runs in this process (uvicorn in a thread, so the engine's state can be inspected at
the end), its engine core in a process of its own as `omnistream serve` runs it
(--no-engine-process: in a thread of this process); clients of every kind the server offers loop concurrently until the
time is up, each over its own connection:
  chat_text      non-streaming text chat completion
  chat_stream    streaming text chat completion (SSE to [DONE])
  chat_image     an image_url data URL (PNG), non-streaming
  chat_video     a video_url data URL (mp4), streaming
  disconnect     streaming, hangs up after two chunks (the server must abort it and free its KV)
  session        /v1/sessions: create, two questions with X-Session-Id, delete   (if served)
  realtime       /v1/realtime: frames, a question, deltas to response.done; every other
                 socket hangs up in the middle of its answer                       (if served)
Resident memory (VmRSS of this process plus the engine process's), threads and the engine's
counters are sampled every --sample-s.

At the end (every check printed; exit 1 if one fails):
  - zero responses with a 5xx status, zero unexpected client errors (refused connections,
    broken streams: a kind's own hang-up is expected);
  - RSS flat after warm-up: the least-squares line through the RSS samples after the warm-up
    (the first --warmup-fraction of the run, at least 30 s when the run allows) rises by at most
    max(RSS_GROWTH_BYTES, RSS_GROWTH_FRACTION x the RSS at the warm-up's end) over the rest
    of the run;
  - nothing leaked once the clients stop: engine.stats() has requests_running 0,
    requests_waiting 0, kv_blocks_free == kv_blocks_total (no retained or owned KV), no
    engine sessions; the server's session registry is empty; once the server is stopped and
    the engine closed, no thread is left that was not there before the server started, and the
    engine process has exited.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

RSS_GROWTH_BYTES = 64 << 20
RSS_GROWTH_FRACTION = 0.05
SETTLE_TIMEOUT_S = 60.0
MODEL = "demo"


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def engine_pid(engine) -> int | None:
    """The engine process's pid (engine_process), else None."""
    process = getattr(engine.core, "process", None)
    return None if process is None else process.pid


def total_rss_bytes(engine) -> int:
    """This process's RSS plus the engine process's (where the KV pool, weights and caches are)."""
    pid = engine_pid(engine)
    return rss_bytes() + (rss_bytes(pid) if pid is not None else 0)


# ---------------------------------------------------------------------------------- media
def _png(size: int, seed: int) -> str:
    from PIL import Image

    from omnistream.bench.workload import synthetic_video_frames

    buf = io.BytesIO()
    Image.fromarray(synthetic_video_frames(1, size, seed)[0]).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _jpeg_frames(n: int, size: int, seed: int) -> list[str]:
    from PIL import Image

    from omnistream.bench.workload import synthetic_video_frames

    out = []
    for frame in synthetic_video_frames(n, size, seed):
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=80)
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def _mp4(tmp: Path) -> str:
    from omnistream.media.samples import write_sample_video

    path = write_sample_video(tmp / "clip.mp4", seconds=2.0, fps=4, width=112, height=84)
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


# ---------------------------------------------------------------------------------- tally
@dataclass
class Tally:
    statuses: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    errors: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    server_errors: list[str] = field(default_factory=list)  # 5xx bodies, for the report
    done: Counter = field(default_factory=Counter)

    def status(self, kind: str, code: int, body: str = "") -> None:
        self.statuses[kind][code] += 1
        if code >= 500:
            self.server_errors.append(f"{kind} {code}: {body[:300]}")

    def fivexx(self) -> int:
        """Responses with a 5xx status, and live answers that ended `failed` (the server's fault
        by the realtime contract: a client's mistake is an `error` event)."""
        return sum(n for c in self.statuses.values() for code, n in c.items()
                   if (isinstance(code, int) and code >= 500) or code == "done:failed")


# ---------------------------------------------------------------------------------- clients
def chat_body(content, max_tokens: int, stream: bool) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


async def post_json(client, tally: Tally, kind: str, body: dict, headers: dict | None = None) -> dict | None:
    r = await client.post("/v1/chat/completions", json=body, headers=headers)
    tally.status(kind, r.status_code, r.text)
    return r.json() if r.status_code == 200 else None


async def post_stream(client, tally: Tally, kind: str, body: dict, hang_up_after: int | None = None) -> int:
    """Reads an SSE answer to [DONE] (or hangs up after `hang_up_after` chunks) -> chunks read."""
    chunks = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            tally.status(kind, r.status_code, (await r.aread()).decode(errors="replace"))
            return 0
        tally.status(kind, 200)
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                if line == "data: [DONE]":
                    return chunks
                chunks += 1
                if hang_up_after is not None and chunks >= hang_up_after:
                    return chunks  # leaving the block closes the connection mid-answer
    raise RuntimeError("stream ended without [DONE]")


async def run_session(client, tally: Tally, i: int) -> None:
    r = await client.post("/v1/sessions", json={"system": "You are a helpful assistant."})
    tally.status("session", r.status_code, r.text)
    if r.status_code != 200:
        return
    sid = r.json()["id"]
    try:
        for q in (f"Question {i}: what is a river?", "And a lake?"):
            await post_json(client, tally, "session", chat_body(q, 6, False), headers={"X-Session-Id": sid})
    finally:
        r = await client.delete(f"/v1/sessions/{sid}")
        tally.status("session", r.status_code, r.text)


async def run_realtime(url: str, tally: Tally, frames: list[str], i: int) -> None:
    """One live session: frames, a question, its answer to response.done (odd rounds hang up
    after the first delta)."""
    from websockets.asyncio.client import connect

    hang_up = i % 2 == 1
    async with connect(url.replace("http://", "ws://") + f"/v1/realtime?model={MODEL}", max_size=None) as ws:
        first = json.loads(await ws.recv())
        if first.get("type") != "session.created":
            raise RuntimeError(f"realtime: first event {first.get('type')!r}")
        for k, image in enumerate(frames):
            await ws.send(json.dumps({"type": "input_image_buffer.append", "image": image, "timestamp_ms": 500 * k}))
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": f"What happened ({i})?"}]}}))
        await ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 8}}))
        while True:
            event = json.loads(await ws.recv())
            kind = event.get("type")
            if kind == "error":
                tally.errors["realtime"][f"error event {event['error'].get('code')}"] += 1
                return
            if kind == "response.output_text.delta" and hang_up:
                return  # closing the socket mid-answer: the server aborts it
            if kind == "response.done":
                status = event["response"].get("status")
                tally.statuses["realtime"][f"done:{status}"] += 1
                if status == "failed":
                    tally.server_errors.append(f"realtime failed: {json.dumps(event)[:300]}")
                return


def client_kinds(app) -> list[str]:
    paths = {getattr(r, "path", None) for r in app.routes}
    kinds = ["chat_text", "chat_stream", "chat_image", "chat_video", "disconnect"]
    if "/v1/sessions" in paths:
        kinds.append("session")
    if "/v1/realtime" in paths:
        kinds.append("realtime")
    return kinds


async def client_loop(kind: str, url: str, deadline: float, tally: Tally, media: dict) -> None:
    import httpx

    i = 0
    async with httpx.AsyncClient(base_url=url, timeout=120.0) as client:
        while time.monotonic() < deadline:
            i += 1
            try:
                if kind == "chat_text":
                    await post_json(client, tally, kind, chat_body(f"Count to {i % 7 + 3}.", 6, False))
                elif kind == "chat_stream":
                    await post_stream(client, tally, kind, chat_body(f"Tell me about the number {i}.", 8, True))
                elif kind == "chat_image":
                    content = [{"type": "image_url", "image_url": {"url": media["images"][i % len(media["images"])]}},
                               {"type": "text", "text": "Describe it."}]
                    await post_json(client, tally, kind, chat_body(content, 6, False))
                elif kind == "chat_video":
                    content = [{"type": "video_url", "video_url": {"url": media["video"]}}, {"type": "text", "text": f"What happens ({i})?"}]
                    await post_stream(client, tally, kind, chat_body(content, 6, True))
                elif kind == "disconnect":
                    await post_stream(client, tally, kind, chat_body(f"Write a long story number {i}.", 64, True), hang_up_after=2)
                elif kind == "session":
                    await run_session(client, tally, i)
                elif kind == "realtime":
                    await run_realtime(url, tally, media["frames"], i)
                tally.done[kind] += 1
            except Exception as e:  # noqa: BLE001 - every unexpected failure is counted and fails the soak
                tally.errors[kind][f"{type(e).__name__}: {str(e)[:120]}"] += 1


# ---------------------------------------------------------------------------------- sampling
@dataclass
class Sample:
    t: float
    rss: int
    threads: int
    running: int
    kv_free: int
    cache_bytes: int  # the bounded caches that fill while warming up: encoder cache (both tiers) + media cache


def cache_bytes(app, stats: dict) -> int:
    enc = stats.get("encoder_cache") or {}
    media = app.state.omni.extras.get("media")
    return enc.get("bytes", 0) + enc.get("cpu_bytes", 0) + (getattr(getattr(media, "cache", None), "bytes", 0) or 0)


async def sampler(app, engine, start: float, deadline: float, every_s: float, samples: list[Sample]) -> None:
    while True:
        stats = await asyncio.to_thread(engine.stats)
        samples.append(Sample(time.monotonic() - start, total_rss_bytes(engine), threading.active_count(), stats["requests_running"],
                              stats["kv_blocks_free"], cache_bytes(app, stats)))
        if time.monotonic() >= deadline:
            return
        await asyncio.sleep(min(every_s, max(0.0, deadline - time.monotonic())))


def rss_trend(samples: list[Sample], warmup_s: float) -> dict:
    """Least-squares line through the RSS samples after warm-up: its rise over that span."""
    after = [s for s in samples if s.t >= warmup_s]
    if len(after) < 3:
        return {"samples": len(after), "rise_bytes": None, "allowed_bytes": None, "ok": None}
    t = np.array([s.t for s in after])
    y = np.array([s.rss for s in after], dtype=np.float64)
    slope, _ = np.polyfit(t, y, 1)
    rise = float(slope * (t[-1] - t[0]))
    allowed = max(RSS_GROWTH_BYTES, RSS_GROWTH_FRACTION * after[0].rss)
    return {"samples": len(after), "from_s": float(t[0]), "to_s": float(t[-1]), "rss_start_bytes": after[0].rss,
            "rss_end_bytes": after[-1].rss, "rss_max_bytes": int(y.max()), "rise_bytes": rise, "allowed_bytes": allowed,
            "ok": rise <= allowed}


# ---------------------------------------------------------------------------------- run
async def wait_idle(engine, timeout_s: float) -> dict:
    """The engine's stats once nothing runs or waits (aborts of hung-up clients land first)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = await asyncio.to_thread(engine.stats)
        if (stats["requests_running"] == 0 and stats["requests_waiting"] == 0) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.2)


async def drive(app, engine, url: str, minutes: float, clients_per_kind: int, sample_s: float, tmp: Path,
                only: list[str] | None = None) -> dict:
    kinds = [k for k in client_kinds(app) if not only or k in only]
    media = {"images": [_png(56, s) for s in range(4)], "video": _mp4(tmp), "frames": _jpeg_frames(4, 112, 0)}
    start = time.monotonic()
    deadline = start + minutes * 60
    tally, samples = Tally(), []
    tasks = [client_loop(k, url, deadline, tally, media) for k in kinds for _ in range(clients_per_kind)]
    await asyncio.gather(sampler(app, engine, start, deadline, sample_s, samples), *tasks)
    idle = await wait_idle(engine, SETTLE_TIMEOUT_S)
    await asyncio.sleep(1.0)  # idle sessions' TTL sweeps, handles' last wake-ups
    idle = await asyncio.to_thread(engine.stats)
    return {"kinds": kinds, "tally": tally, "samples": samples, "idle_stats": idle, "elapsed_s": time.monotonic() - start}


def check(result: dict, registry_counts: dict | None, leaked_threads: list[str], warmup_s: float,
          engine_exit: int | None = 0) -> list[tuple[str, bool, str]]:
    """engine_exit: the engine process's exit code after close (0 when it runs in a thread)."""
    tally, stats = result["tally"], result["idle_stats"]
    unexpected = {k: dict(v) for k, v in tally.errors.items() if v}
    trend = rss_trend(result["samples"], warmup_s)
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:.1f} MiB"  # noqa: E731
    return [
        ("zero 5xx responses", tally.fivexx() == 0, f"{tally.fivexx()}" + (f": {tally.server_errors[:3]}" if tally.server_errors else "")),
        ("zero unexpected client errors", not unexpected, json.dumps(unexpected)[:400] if unexpected else "0"),
        ("every kind completed requests", all(result["tally"].done[k] > 0 for k in result["kinds"]), dict(result["tally"].done).__repr__()),
        ("RSS flat after warm-up", bool(trend["ok"]), f"rise {mib(trend['rise_bytes'])} over {trend.get('from_s', 0):.0f}-{trend.get('to_s', 0):.0f} s "
         f"(allowed {mib(trend['allowed_bytes'])}; start {mib(trend.get('rss_start_bytes'))}, end {mib(trend.get('rss_end_bytes'))}, "
         f"max {mib(trend.get('rss_max_bytes'))}; {trend['samples']} samples)"),
        ("no requests running or waiting", stats["requests_running"] == 0 and stats["requests_waiting"] == 0,
         f"running {stats['requests_running']}, waiting {stats['requests_waiting']}"),
        ("no KV blocks held", stats["kv_blocks_free"] == stats["kv_blocks_total"],
         f"free {stats['kv_blocks_free']}/{stats['kv_blocks_total']} (retained {stats['kv_blocks_retained']}, owned {stats['kv_blocks_owned']})"),
        ("no engine sessions left", stats["sessions"] == 0, f"{stats['sessions']}"),
        ("server session registry empty", not registry_counts or not any(registry_counts.values()), f"{registry_counts}"),
        ("no threads leaked", not leaked_threads, ", ".join(leaked_threads) or "none"),
        ("engine process exited cleanly", engine_exit == 0, f"exit code {engine_exit}"),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="length of the run (default: 10)")
    p.add_argument("--clients-per-kind", type=int, default=1, help="concurrent clients of each kind (default: 1)")
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between RSS samples (default: 5)")
    p.add_argument("--warmup-fraction", type=float, default=0.2, help="share of the run before RSS must stay flat (default: 0.2)")
    p.add_argument("--kinds", default=None, help="only these client kinds, comma separated (to find what grows); default: all served")
    p.add_argument("--json", default=None, help="write the samples and counts here")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="the engine core in its own process, as serve runs it (default: on)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from omnistream.entrypoints.api import Engine
    from omnistream.entrypoints.serving import BackgroundServer
    from omnistream.server.app import build_app
    from omnistream.server.config import ServerConfig

    threads_before = {t.ident: t.name for t in threading.enumerate()}
    engine = Engine.from_pretrained(MODEL, device="cpu", engine_process=args.engine_process)
    app = build_app(engine, ServerConfig(served_model_name=MODEL))
    with tempfile.TemporaryDirectory(prefix="omnistream-soak-") as tmp, BackgroundServer(app) as server:
        print(f"soak: {server.url}, demo model on the CPU, {args.minutes:g} min, {args.clients_per_kind} client(s) per kind", flush=True)
        only = args.kinds.split(",") if args.kinds else None
        result = asyncio.run(drive(app, engine, server.url, args.minutes, args.clients_per_kind, args.sample_s, Path(tmp), only))
        registry = app.state.omni.extras.get("sessions")
        registry_counts = registry.counts() if registry is not None and hasattr(registry, "counts") else None
    engine.close()
    time.sleep(1.0)
    leaked = [f"{t.name}" for t in threading.enumerate() if t.ident not in threads_before and t.is_alive()]
    warmup_s = max(min(30.0, 0.5 * args.minutes * 60), args.warmup_fraction * args.minutes * 60)
    engine_exit = engine.core.process.poll() if engine_pid(engine) is not None else 0
    rows = check(result, registry_counts, leaked, warmup_s, engine_exit)
    print_summary(result, rows)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "minutes": args.minutes, "kinds": result["kinds"], "done": dict(result["tally"].done),
            "statuses": {k: {str(c): n for c, n in v.items()} for k, v in result["tally"].statuses.items()},
            "errors": {k: dict(v) for k, v in result["tally"].errors.items()},
            "samples": [s.__dict__ for s in result["samples"]], "idle_stats": result["idle_stats"],
            "checks": [{"check": n, "ok": ok, "detail": d} for n, ok, d in rows]}, indent=2, default=str))
    return 0 if all(ok for _, ok, _ in rows) else 1


def print_summary(result: dict, rows: list[tuple[str, bool, str]]) -> None:
    tally = result["tally"]
    print(f"ran {result['elapsed_s']:.0f} s; completed per kind: {dict(tally.done)}")
    for kind, codes in sorted(tally.statuses.items()):
        print(f"  {kind:<12} " + ", ".join(f"{c}: {n}" for c, n in sorted(codes.items(), key=str)))
    for s in result["samples"][:: max(1, len(result["samples"]) // 12)]:
        print(f"  t={s.t:6.0f} s  RSS {s.rss / 2**20:8.1f} MiB  caches {s.cache_bytes / 2**20:7.1f} MiB  threads {s.threads:3d}  "
              f"running {s.running:2d}  kv free {s.kv_free}")
    for name, ok, detail in rows:
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")


if __name__ == "__main__":
    sys.exit(main())
