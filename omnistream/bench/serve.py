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
   line) on the same model and engine options; chat completions through httpx as OpenAI
   streaming chat completions (SSE, stream_options.include_usage), media as data URLs; live
   streams through the `websockets` client.
3. In-process: the server exits, then the same model is built here (same seeded weights) and
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
from typing import Any, Awaitable, Callable

import numpy as np

from omnistream.bench.concurrency import context_words, fmt_num, mean, pct, target_mark
from omnistream.bench.workload import synthetic_video_frames
from omnistream.server.config import ServerConfig

KINDS = ("text", "image", "video", "session", "live")
QUESTIONS = {"text": "Summarise my notes in one sentence.", "image": "Describe this image.", "video": "What happens in this video?"}
SESSION_SYSTEM = "You are a helpful assistant."
SESSION_QUESTIONS = ("Describe this image.", "What colours stand out?", "Is there any text in it?", "Summarise it in five words.",
                     "What would you name it?", "Anything else worth noting?")
LIVE_QUESTIONS = ("What is happening?", "What changed since then?", "Describe the latest frames.", "Anything new?")
LIVE_POLICIES = ("exact", "fast")
FOLLOWUP = "session_followup"  # the sample kind of a session's questions after its first
# for 3B on an H200 with 32 streaming clients (issue 9)
TARGET_TTFT_P50_DELTA_S, TARGET_TTFT_P99_RATIO, TARGET_TPS_RATIO = 0.003, 1.2, 0.9
VIDEO_FPS = 2.0
WARMUP_MAX = 8  # concurrent untimed items before each phase
SERVER_START_TIMEOUT_S = 900.0  # a 7B random model on a GPU, CUDA graphs captured
JPEG_QUALITY = 85  # the live frames, as a camera page sends them


# ---------------------------------------------------------------------------------- workload
def parse_mix(text: str) -> dict[str, float]:
    """'text=2,image=1,session=1,live=1' (or 'text,image') -> {kind: weight}."""
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
class SessionPlan:
    """A pinned session: its system prompt and media, then its questions one by one."""

    system: str
    http_media: dict  # the image_url part POSTed to /v1/sessions/{id}/media
    engine_media: dict  # the same image for Session.add_image: {"src", min_pixels, max_pixels}
    questions: list[str]


@dataclass
class LivePlan:
    """A live stream: frames at a rate, a question after each share of them."""

    frames: list[bytes]  # JPEG bytes, as sent (base64) and as decoded in-process
    fps: float
    cuts: list[int]  # question k is asked once frames[:cuts[k]] are sent
    questions: list[str]
    pixels: int  # min = max pixels of every frame (session.update / live_session)
    policy: str

    def timestamp_ms(self, i: int) -> int:
        return round(1000.0 * i / self.fps)


@dataclass
class Spec:
    """One work item of the workload, in both forms."""

    index: int
    kind: str
    openai_messages: list[dict] = field(default_factory=list)  # a chat completion, as the HTTP client sends it
    engine_messages: list[dict] = field(default_factory=list)  # the same conversation for Engine.request_for
    session: SessionPlan | None = None
    live: LivePlan | None = None


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


def _jpeg(frame: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=JPEG_QUALITY)
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


def _image(index: int, size: int, media_dir: Path, seed: int) -> tuple[dict, dict]:
    """A seeded PNG -> (its image_url part, its engine part), kept at size x size."""
    pixels = {"min_pixels": size * size, "max_pixels": size * size}  # kept at --size: known token counts
    data = _png(synthetic_video_frames(1, size, seed)[0])
    path = media_dir / f"{index}.png"
    path.write_bytes(data)
    return ({"type": "image_url", "image_url": {"url": _data_url("image/png", data), **pixels}},
            {"type": "image", "image": str(path), **pixels})


def _cuts(frames: int, questions: int) -> list[int]:
    """Question k after an even share of the frames (the last after all of them)."""
    return [max(1, round(frames * (k + 1) / questions)) for k in range(questions)]


def make_spec(index: int, kind: str, tokenizer, opts: dict, media_dir: Path, seed: int) -> Spec:
    if kind == "text":
        text = f"Here are my notes:\n{context_words(tokenizer, opts['prompt_tokens'], seed)}\n{QUESTIONS['text']}"
        return Spec(index, kind, [{"role": "user", "content": text}], [{"role": "user", "content": text}])
    size = opts["size"]
    if kind == "session":
        http_part, engine_part = _image(index, size, media_dir, seed)
        engine_media = {"src": engine_part["image"], "min_pixels": engine_part["min_pixels"], "max_pixels": engine_part["max_pixels"]}
        turns = [SESSION_QUESTIONS[k % len(SESSION_QUESTIONS)] + (f" ({k // len(SESSION_QUESTIONS)})" if k >= len(SESSION_QUESTIONS) else "")
                 for k in range(opts["session_turns"])]
        return Spec(index, kind, session=SessionPlan(SESSION_SYSTEM, http_part, engine_media, turns))
    if kind == "live":
        n, q = opts["live_frames"], opts["live_questions"]
        frames = [_jpeg(f) for f in synthetic_video_frames(n, size, seed)]
        questions = [LIVE_QUESTIONS[k % len(LIVE_QUESTIONS)] for k in range(q)]
        return Spec(index, kind, live=LivePlan(frames, opts["live_fps"], _cuts(n, q), questions, size * size, opts["live_policy"]))
    if kind == "image":
        http_part, engine_part = _image(index, size, media_dir, seed)
    else:
        pixels = {"min_pixels": size * size, "max_pixels": size * size}
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
    """One timed request as its client saw it (perf_counter seconds): a chat completion, a
    session's question, a live stream's question."""

    index: int
    kind: str
    sent: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # each chunk that carried text
    ended: float | None = None
    text: str = ""
    output_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from KV already there (a session's pinned KV, the prefix cache)
    error: str | None = None  # HTTP status ("503"), realtime error code or exception type; None: ok
    turn: int = 0  # the question's place in its session or live stream
    exact: bool = True  # a greedy answer both phases must agree on (not a live `fast` one)
    # the engine's own timings of this request (RequestMetrics.as_dict: the server's final usage
    # chunk over HTTP); TTFT minus their ttft_s is what lies outside the engine (transport,
    # parsing, the client)
    server: dict = field(default_factory=dict)

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times[0] - self.sent if self.chunk_times else None

    @property
    def e2e_s(self) -> float | None:
        return None if self.ended is None or self.error else self.ended - self.sent


def _samples(spec: Spec) -> list[Sample]:
    """The timed requests of one work item, not sent yet."""
    if spec.session is not None:
        return [Sample(spec.index, "session" if k == 0 else FOLLOWUP, turn=k) for k in range(len(spec.session.questions))]
    if spec.live is not None:
        return [Sample(spec.index, "live", turn=k, exact=spec.live.policy == "exact") for k in range(len(spec.live.questions))]
    return [Sample(spec.index, spec.kind)]


def _fail(samples: list[Sample], error: str) -> list[Sample]:
    """The item broke off: every question not answered yet carries the error."""
    now = time.perf_counter()
    for s in samples:
        if s.ended is None:
            s.error, s.ended = s.error or error, now
            s.sent = s.sent or now
    return samples


# ---------------------------------------------------------------------------------- HTTP clients
def _chat_payload(model: str, messages: list[dict], max_tokens: int) -> dict:
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


async def _stream_chat(client, payload: dict, s: Sample, headers: dict | None = None) -> Sample:
    s.sent = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=payload, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                s.error = str(r.status_code)
                s.ended = time.perf_counter()
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
    if "error" in chunk:  # an error after the first byte (the status was 200 by then)
        s.error = str((chunk["error"] or {}).get("code") or "stream_error")
        return
    usage = chunk.get("usage")
    if chunk.get("metrics"):
        s.server = chunk["metrics"]
    if usage:
        s.output_tokens = usage.get("completion_tokens", 0)
        s.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    for choice in chunk.get("choices") or []:
        content = (choice.get("delta") or {}).get("content")
        if content:
            s.chunk_times.append(time.perf_counter())
            s.text += content


async def http_request(client, model: str, spec: Spec, max_tokens: int) -> list[Sample]:
    [s] = _samples(spec)
    return [await _stream_chat(client, _chat_payload(model, spec.openai_messages, max_tokens), s)]


async def http_session(client, model: str, spec: Spec, max_tokens: int) -> list[Sample]:
    """POST /v1/sessions, its media, then each question with X-Session-Id (streaming); deleted at the end."""
    plan, samples = spec.session, _samples(spec)
    try:
        r = await client.post("/v1/sessions", json={"system": plan.system})
        if r.status_code != 200:
            return _fail(samples, f"open:{r.status_code}")
        sid = r.json()["id"]
        try:
            r = await client.post(f"/v1/sessions/{sid}/media", json=plan.http_media)
            if r.status_code != 200:
                return _fail(samples, f"media:{r.status_code}")
            for s, question in zip(samples, plan.questions):
                payload = _chat_payload(model, [{"role": "user", "content": question}], max_tokens)
                await _stream_chat(client, payload, s, headers={"X-Session-Id": sid})
        finally:
            await client.delete(f"/v1/sessions/{sid}")
    except Exception as e:  # noqa: BLE001
        return _fail(samples, type(e).__name__)
    return samples


async def _pace(t0: float, seconds: float) -> None:
    await asyncio.sleep(max(0.0, t0 + seconds - time.perf_counter()))


async def drive_live(plan: LivePlan, samples: list[Sample], add_frame: Callable[[int], Awaitable[None]],
                     ask: Callable[[int, asyncio.Event], Awaitable[None]]) -> None:
    """The live script, the same in both phases: frames at plan.fps; question k once its share of
    the frames is sent and the previous answer is done (one answer in flight per socket); the
    next share of frames goes while it streams. ask(k, done) starts question k and sets `done`
    when its answer ends; the order of frames and questions never depends on timing."""
    t0 = time.perf_counter()
    done = [asyncio.Event() for _ in plan.questions]
    sent = 0
    for k, cut in enumerate(plan.cuts):
        for i in range(sent, cut):
            await _pace(t0, i / plan.fps)
            await add_frame(i)
        sent = max(sent, cut)
        if k:
            await done[k - 1].wait()
        samples[k].sent = time.perf_counter()
        await ask(k, done[k])
    await done[-1].wait()


def _question_events(text: str, max_tokens: int) -> list[dict]:
    return [{"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                         "content": [{"type": "input_text", "text": text}]}},
            {"type": "response.create", "response": {"max_output_tokens": max_tokens, "temperature": 0}}]


async def http_live(url: str, model: str, spec: Spec, max_tokens: int) -> list[Sample]:
    """One /v1/realtime socket: session.update (frame size, policy), the live script; a reader
    task times each answer's deltas and ends it at response.done (or its error)."""
    from websockets.asyncio.client import connect

    plan, samples = spec.live, _samples(spec)
    waiting: dict[int, asyncio.Event] = {}
    current = [0]  # the question being answered

    async def read(ws) -> None:
        async for message in ws:
            event = json.loads(message)
            if current[0] >= len(samples):
                continue  # after the last answer (a late error event): nothing to time
            kind, s = event.get("type"), samples[current[0]]
            if kind == "response.output_text.delta":
                s.chunk_times.append(time.perf_counter())
                s.text += event["delta"]
            elif kind == "error":
                s.error = s.error or str(event["error"].get("code"))  # a bad frame or question: counted
            elif kind == "response.done":
                resp = event["response"]
                s.ended = time.perf_counter()
                usage = resp.get("usage") or {}
                s.output_tokens = usage.get("output_tokens", 0)
                s.cached_tokens = (usage.get("input_token_details") or {}).get("cached_tokens") or 0
                if resp.get("status") not in ("completed", "incomplete"):
                    s.error = s.error or f"done:{resp.get('status')}"
                elif resp.get("output_text") != s.text:
                    s.error = s.error or "deltas_differ"
                current[0] += 1
                waiting.pop(current[0] - 1).set()

    try:
        async with connect(url.replace("http://", "ws://") + f"/v1/realtime?model={model}", max_size=None) as ws:
            first = json.loads(await ws.recv())
            if first.get("type") != "session.created":
                return _fail(samples, f"first:{first.get('type')}")
            await ws.send(json.dumps({"type": "session.update", "session": {
                "max_pixels": plan.pixels, "min_pixels": plan.pixels, "policy": plan.policy}}))
            updated = json.loads(await ws.recv())
            if updated.get("type") != "session.updated":
                return _fail(samples, f"update:{(updated.get('error') or {}).get('code', updated.get('type'))}")
            reader = asyncio.get_running_loop().create_task(read(ws))

            async def add_frame(i: int) -> None:
                await ws.send(json.dumps({"type": "input_image_buffer.append", "image": base64.b64encode(plan.frames[i]).decode(),
                                          "timestamp_ms": plan.timestamp_ms(i)}))

            async def ask(k: int, done: asyncio.Event) -> None:
                waiting[k] = done
                for event in _question_events(plan.questions[k], max_tokens):
                    await ws.send(json.dumps(event))

            try:
                script = asyncio.get_running_loop().create_task(drive_live(plan, samples, add_frame, ask))
                await asyncio.wait([script, reader], return_when=asyncio.FIRST_COMPLETED)
                if not script.done():  # the socket ended before the answers
                    script.cancel()
                    return _fail(samples, "socket_closed")
                script.result()
            finally:
                reader.cancel()
    except Exception as e:  # noqa: BLE001
        return _fail(samples, type(e).__name__)
    return samples


# ---------------------------------------------------------------------------------- in-process
async def _read_answer(s: Sample, answer) -> None:
    """A PendingAnswer's deltas (timed), then its commit into the session's history."""
    async for delta in answer.handle:
        if delta.text:
            s.chunk_times.append(time.perf_counter())
            s.text += delta.text
    res = await asyncio.get_running_loop().run_in_executor(None, answer.finish)
    s.output_tokens, s.cached_tokens, s.server = len(res.token_ids), res.metrics.cached_tokens, res.metrics.as_dict()
    s.ended = time.perf_counter()


async def engine_request(engine, pool: ThreadPoolExecutor, spec: Spec, sampling) -> list[Sample]:
    [s] = _samples(spec)
    s.sent = time.perf_counter()
    try:
        loop = asyncio.get_running_loop()
        request = await loop.run_in_executor(pool, engine.request_for, spec.engine_messages, sampling)
        handle = engine.submit(request)
        async for delta in handle:
            if delta.text:
                s.chunk_times.append(time.perf_counter())
                s.text += delta.text
        res = handle.result()
        s.output_tokens, s.cached_tokens, s.server = len(res.token_ids), res.metrics.cached_tokens, res.metrics.as_dict()
    except Exception as e:  # noqa: BLE001
        s.error = type(e).__name__
    s.ended = time.perf_counter()
    return [s]


async def engine_session(engine, pool: ThreadPoolExecutor, spec: Spec, sampling) -> list[Sample]:
    """engine.session(), its image (decoded in the media pool), then Session.start per question
    (in the loop's default executor, as the server runs it), the answer read as it streams."""
    plan, samples = spec.session, _samples(spec)
    loop = asyncio.get_running_loop()
    session = engine.session(system=plan.system)
    try:
        media = dict(plan.engine_media)
        await loop.run_in_executor(pool, lambda: session.add_image(media.pop("src"), **media))
        for s, question in zip(samples, plan.questions):
            s.sent = time.perf_counter()
            try:
                answer = await loop.run_in_executor(None, session.start, question, sampling)
                await _read_answer(s, answer)
            except Exception as e:  # noqa: BLE001
                s.error, s.ended = type(e).__name__, time.perf_counter()
    except Exception as e:  # noqa: BLE001
        _fail(samples, type(e).__name__)
    finally:
        await loop.run_in_executor(None, session.close)
    return samples


async def engine_live(engine, pool: ThreadPoolExecutor, spec: Spec, max_tokens: int, max_image_pixels: int) -> list[Sample]:
    """engine.live_session() with the socket's settings; each frame's JPEG decoded in the media
    pool then add_frame, in order; LiveSession.start per question (before the next frames are
    added, as the server's intake does), its answer streaming in its own task."""
    from omnistream.engine.sampling import SamplingParams
    from omnistream.media.frame_memory import FrameMemoryConfig
    from omnistream.server.realtime import decode_frame

    plan, samples = spec.live, _samples(spec)
    loop = asyncio.get_running_loop()
    sampling = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=max_tokens)  # what response.create gives
    live = await loop.run_in_executor(None, lambda: engine.live_session(
        memory=FrameMemoryConfig(), policy=plan.policy, max_pixels=plan.pixels, min_pixels=plan.pixels))
    tasks: list[asyncio.Task] = []

    async def add_frame(i: int) -> None:
        await loop.run_in_executor(pool, lambda: live.add_frame(decode_frame(plan.frames[i], max_image_pixels),
                                                                plan.timestamp_ms(i) / 1000.0))

    async def ask(k: int, done: asyncio.Event) -> None:
        s = samples[k]

        async def stream(answer) -> None:
            try:
                await _read_answer(s, answer)
            except Exception as e:  # noqa: BLE001
                s.error, s.ended = type(e).__name__, time.perf_counter()
            finally:
                done.set()

        try:
            answer = await loop.run_in_executor(None, live.start, plan.questions[k], sampling)
        except Exception as e:  # noqa: BLE001
            s.error, s.ended = type(e).__name__, time.perf_counter()
            done.set()
            return
        tasks.append(loop.create_task(stream(answer)))

    try:
        await drive_live(plan, samples, add_frame, ask)
    except Exception as e:  # noqa: BLE001
        _fail(samples, type(e).__name__)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await loop.run_in_executor(None, live.close)
    return samples


# ---------------------------------------------------------------------------------- schedules
async def run_schedule(send: Callable[[Spec], Awaitable[list[Sample]]], w: Workload) -> tuple[list[Sample], float, float]:
    """send(spec) -> its Samples, over the workload's schedule -> (samples in spec order, start, end)."""
    await asyncio.gather(*(send(spec) for spec in w.warmup))  # untimed: first kernels, media paths, batching
    start = time.perf_counter()
    if w.offsets is None:
        async def client(c: int) -> list[Sample]:
            return [s for spec in w.specs[c::w.clients] for s in await send(spec)]

        groups = await asyncio.gather(*(client(c) for c in range(w.clients)))
    else:
        async def arrive(spec: Spec, offset: float) -> list[Sample]:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            return await send(spec)

        groups = await asyncio.gather(*(arrive(sp, off) for sp, off in zip(w.specs, w.offsets)))
    samples = sorted((s for group in groups for s in group), key=lambda s: (s.index, s.turn))
    return samples, start, time.perf_counter()


async def http_phase(url: str, model: str, w: Workload, max_tokens: int) -> tuple[list[Sample], float, float]:
    import httpx

    limits = httpx.Limits(max_connections=len(w.specs) + 8, max_keepalive_connections=len(w.specs) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        def send(spec: Spec) -> Awaitable[list[Sample]]:
            if spec.session is not None:
                return http_session(client, model, spec, max_tokens)
            if spec.live is not None:
                return http_live(url, model, spec, max_tokens)
            return http_request(client, model, spec, max_tokens)

        return await run_schedule(send, w)


async def engine_phase(engine, w: Workload, sampling) -> tuple[list[Sample], float, float]:
    # as many media decodes at once as the server runs (ServerConfig.media_decode_threads): the same work, the same way
    config = ServerConfig()
    with ThreadPoolExecutor(max_workers=config.media_decode_threads, thread_name_prefix="bench-media") as pool:
        def send(spec: Spec) -> Awaitable[list[Sample]]:
            if spec.session is not None:
                return engine_session(engine, pool, spec, sampling)
            if spec.live is not None:
                return engine_live(engine, pool, spec, sampling.max_new_tokens, config.max_image_pixels)
            return engine_request(engine, pool, spec, sampling)

        return await run_schedule(send, w)


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


def _itl(samples: list[Sample]) -> list[float]:
    return [b - a for s in samples for a, b in zip(s.chunk_times, s.chunk_times[1:])]


def kind_order(kind: str) -> tuple[int, str]:
    """Rows in the order of KINDS, a session's follow-ups right after its first questions."""
    names = [*KINDS[:KINDS.index("session") + 1], FOLLOWUP, *KINDS[KINDS.index("session") + 1:]]
    return (names.index(kind) if kind in names else len(names), kind)


def _engine_split(samples: list[Sample]) -> dict[str, float | None]:
    """Medians of where the time to the first token went: in the engine (its TTFT counts from
    the request's arrival at the server / the in-process caller, media decoding included), the
    media decoding and queueing inside that, and the rest outside the engine."""
    timed = [s for s in samples if s.server.get("ttft_s") is not None and s.ttft_s is not None]
    return {"engine_ttft_p50_s": pct([s.server["ttft_s"] for s in timed], 50),
            "media_p50_s": pct([s.server.get("media_decode_s", 0) + s.server.get("preprocess_s", 0) for s in timed], 50),
            "queue_p50_s": pct([s.server["queue_s"] for s in timed if s.server.get("queue_s") is not None], 50),
            "outside_p50_s": pct([s.ttft_s - s.server["ttft_s"] for s in timed], 50),
            # HTTP only: the server's parts of "outside" (reading + parsing the request; handing
            # the first token to the socket); the rest is the connection and the client
            "receive_p50_s": pct([s.server["server_receive_s"] for s in timed if "server_receive_s" in s.server], 50),
            "send_p50_s": pct([s.server["server_send_s"] for s in timed if "server_send_s" in s.server], 50)}


def summarize(samples: list[Sample], start: float, end: float) -> dict[str, Any]:
    ok = [s for s in samples if s.error is None]
    ended = max((s.ended for s in ok), default=end)
    wall = ended - start
    tokens = sum(s.output_tokens for s in ok)
    itl = _itl(ok)
    by_kind = {}
    for kind in sorted({s.kind for s in samples}, key=kind_order):
        mine = [s for s in ok if s.kind == kind]
        by_kind[kind] = {"requests": sum(s.kind == kind for s in samples), "ok": len(mine),
                         "errors": dict(Counter(s.error for s in samples if s.kind == kind and s.error)),
                         **_percentiles("ttft", [s.ttft_s for s in mine]), "itl_p50_s": pct(_itl(mine), 50),
                         "e2e_p50_s": pct([s.e2e_s for s in mine], 50), "mean_output_tokens": mean([s.output_tokens for s in mine]),
                         "mean_cached_tokens": mean([s.cached_tokens for s in mine]), **_engine_split(mine)}
    return {
        "requests": len(samples), "ok": len(ok), "errors": dict(Counter(s.error for s in samples if s.error)),
        "errors_by_kind": {k: v["errors"] for k, v in by_kind.items() if v["errors"]},
        "output_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else None,
        **_percentiles("ttft", [s.ttft_s for s in ok]), **_percentiles("itl", itl), **_percentiles("e2e", [s.e2e_s for s in ok]),
        "itl_samples": len(itl), "by_kind": by_kind, **_engine_split(ok),
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


def equal_answers(http: list[Sample], local: list[Sample]) -> dict[str, Any]:
    """Greedy answers of both phases, question by question, where they are exact (not live
    `fast` answers: those depend on when the session's KV edits ran)."""
    theirs = {(s.index, s.turn): s for s in local}
    pairs = [(a, theirs[(a.index, a.turn)]) for a in http if (a.index, a.turn) in theirs]
    pairs = [(a, b) for a, b in pairs if a.error is None and b.error is None]
    exact = [(a, b) for a, b in pairs if a.exact and b.exact]
    by_kind = {}
    for kind in sorted({a.kind for a, _ in pairs}, key=kind_order):
        mine = [(a, b) for a, b in exact if a.kind == kind]
        by_kind[kind] = {"compared": len(mine), "equal": sum(a.text == b.text for a, b in mine),
                         "not_compared": sum(a.kind == kind for a, _ in pairs) - len(mine)}
    return {"compared": len(exact), "equal": sum(a.text == b.text for a, b in exact),
            "not_compared": len(pairs) - len(exact), "by_kind": by_kind}


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
        # the reference is the engine in this process's thread, whatever the server runs
        local_options = {k: v for k, v in dict(cfg.engine_options).items() if k != "engine_process"}
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
      f"{'server receive':>16}{'server send':>13}")
    rows = [("all", r["http"], r["in_process"])]
    rows += [(kind, k, r["in_process"]["by_kind"].get(kind, {})) for kind, k in r["http"]["by_kind"].items()]
    for name, h, lk in rows:
        both = lambda key: f"{fmt_num(h.get(key), 1000, 1)} / {fmt_num(lk.get(key), 1000, 1)}"  # noqa: E731
        p(f"  {name:<36}{both('engine_ttft_p50_s'):>18}{both('media_p50_s'):>18}{both('queue_p50_s'):>18}{both('outside_p50_s'):>18}"
          f"{fmt_num(h.get('receive_p50_s'), 1000, 1):>16}{fmt_num(h.get('send_p50_s'), 1000, 1):>13}")
    o, a = r["overhead"], r["answers"]
    p(f"HTTP overhead: TTFT p50 {fmt_num(o['ttft_p50_delta_s'], 1000, 2)} ms, p99 {fmt_num(o['ttft_p99_ratio'], digits=3)}x; "
      f"ITL p50 {fmt_num(o['itl_p50_delta_s'], 1000, 2)} ms, p99 {fmt_num(o['itl_p99_ratio'], digits=3)}x; "
      f"E2E p50 {fmt_num(o['e2e_p50_delta_s'], 1000, 2)} ms, p99 {fmt_num(o['e2e_p99_ratio'], digits=3)}x; tokens/s {fmt_num(o['tokens_per_s_ratio'], digits=3)}x")
    extra = f" ({a['not_compared']} live `fast` answers not compared: timing-dependent)" if a.get("not_compared") else ""
    p(f"greedy answers equal over HTTP and in-process: {a['equal']}/{a['compared']}{extra}")
    note = "" if (str(w["model"]) == "3b" and env["gpu"]) else f" (set for 3B on an H200, 32 clients; this run: {w['model']} on {env['gpu'] or 'CPU'}, indicative only)"
    p(f"targets{note}:")
    for t in r["targets"]:
        scale, unit, digits = (1000, " ms", 2) if t["metric"].endswith("_s") else (1, "x", 3)
        p(f"  {t['target']:<40} {fmt_num(t['value'], scale, digits) + unit:>12}  {target_mark(t['ok'])}")


def cmd_bench_serve(args) -> int:
    from omnistream.bench.multiturn import model_arg, write_json
    from omnistream.entrypoints.cli import _default_device
    from omnistream.entrypoints.options import engine_options

    if args.rate is not None and not args.rate > 0:
        raise SystemExit("error: --rate must be > 0 (items/s)")
    if not args.live_fps > 0:
        raise SystemExit("error: --live-fps must be > 0")
    device = _default_device(args.device)
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
