"""bench serve's work: the items of a run (text, image, video chat completions, pinned sessions,
live streams) with their seeded media, the Samples their questions are timed in, and the
schedule both phases send them on (closed-loop clients or Poisson arrivals).
"""

from __future__ import annotations

import asyncio
import base64
import io
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import numpy as np

from omnistream.bench.text_prompts import context_words
from omnistream.bench.workload import synthetic_video_frames


KINDS = ("text", "image", "video", "session", "live")
QUESTIONS = {"text": "Summarise my notes in one sentence.", "image": "Describe this image.", "video": "What happens in this video?"}
SESSION_SYSTEM = "You are a helpful assistant."
SESSION_QUESTIONS = ("Describe this image.", "What colours stand out?", "Is there any text in it?", "Summarise it in five words.",
                     "What would you name it?", "Anything else worth noting?")
LIVE_QUESTIONS = ("What is happening?", "What changed since then?", "Describe the latest frames.", "Anything new?")
LIVE_POLICIES = ("exact", "fast")
FOLLOWUP = "session_followup"  # the sample kind of a session's questions after its first
VIDEO_FPS = 2.0
JPEG_QUALITY = 85  # the live frames, as a camera page sends them
WARMUP_MAX = 8  # concurrent untimed items before each phase


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


def samples_for(spec: Spec) -> list[Sample]:
    """The timed requests of one work item, not sent yet."""
    if spec.session is not None:
        return [Sample(spec.index, "session" if k == 0 else FOLLOWUP, turn=k) for k in range(len(spec.session.questions))]
    if spec.live is not None:
        return [Sample(spec.index, "live", turn=k, exact=spec.live.policy == "exact") for k in range(len(spec.live.questions))]
    return [Sample(spec.index, spec.kind)]


def fail_rest(samples: list[Sample], error: str) -> list[Sample]:
    """The item broke off: every question not answered yet carries the error."""
    now = time.perf_counter()
    for s in samples:
        if s.ended is None:
            s.error, s.ended = s.error or error, now
            s.sent = s.sent or now
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
