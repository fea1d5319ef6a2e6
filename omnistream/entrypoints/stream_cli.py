"""`omnistream stream VIDEO --ask 10:"question" ...`: plays a video file as a live camera.

The file is decoded and sampled at --fps (omnistream.media.video.decode_video), then its frames
are fed to a LiveSession at their timestamps: --speed 1 sleeps to real time (a question is
answered while the camera's clock keeps running; frames that came due meanwhile are fed at once
after it), --speed max feeds as fast as possible. At each --ask time (seconds into the video) the
session is flushed (everything up to that time ingested) and asked; the answer and the
per-question metrics (seed 004's fields) are printed. Questions timed after the end of the video
are asked at its end.

--compare also answers each question natively (transformers, from scratch) over
  (a) all frames sampled so far, one user turn: video + question (what a stateless pipeline does)
  (b) the retained frames: exactly the engine's prompt (LiveSession.prompt_for: ids and media)
and prints token agreement with the engine and latency side by side.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from omnistream.entrypoints import options
from omnistream.entrypoints.progress import Progress
from omnistream.errors import ConfigError, UserInputError

METRIC_ROWS = (
    ("total_latency", "s"), ("ttft_s", "s"), ("encoding_latency", "s"), ("prefill_latency", "s"),
    ("generation_latency", "s"), ("frames_encoded", ""), ("visual_tokens", ""), ("kv_cache_length", ""),
    ("cached_tokens", ""), ("star_size", "frames"), ("stream_size", "frames"), ("compression_ratio", ""), ("policy", ""),
)


def parse_ask(text: str) -> tuple[float, str]:
    """'10:What is happening?' -> (10.0, 'What is happening?')."""
    when, sep, question = text.partition(":")
    try:
        t = float(when)
    except ValueError:
        t = None
    if not sep or t is None or t < 0 or not question.strip():
        raise ConfigError(f"--ask wants SECONDS:QUESTION (e.g. 10:\"What happened?\"), got {text!r}")
    return t, question.strip()


def print_live_metrics(res, out=None) -> None:
    """One answer's live metrics (res.live) and request metrics (res.metrics), one per row."""
    out = out or sys.stdout
    print(f"  {'metric':<20}{'value':>12}", file=out)
    for key, unit in METRIC_ROWS:
        v = getattr(res.live, key, None) if hasattr(res.live, key) else getattr(res.metrics, key, None)
        text = "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
        print(f"  {key:<20}{text:>12} {unit}", file=out)


def _fmt_ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1000:.1f}"


def print_compare(rows: list[tuple[str, int, int, dict, str]], out=None) -> None:
    """rows: (system, frames, prompt tokens, {"ttft_s", "total_s"}, agreement with the engine)."""
    out = out or sys.stdout
    print(f"  {'compare':<34}{'frames':>7}{'prompt':>8}{'TTFT ms':>10}{'total ms':>10}  tokens = engine", file=out)
    for name, frames, prompt, r, agree in rows:
        print(f"  {name:<34}{frames:>7}{prompt:>8}{_fmt_ms(r['ttft_s']):>10}{_fmt_ms(r['total_s']):>10}  {agree}", file=out)


def cmd_stream(args) -> int:
    from omnistream.media.processor import check_pixel_count
    from omnistream.media.video import decode_video

    asks = sorted((parse_ask(a) for a in args.ask), key=lambda x: x[0])
    if not asks:
        raise ConfigError("give at least one --ask SECONDS:QUESTION")
    if args.speed not in ("1", "max"):
        raise ConfigError(f"--speed is 1 (real time) or max, got {args.speed!r}")
    sampling = options.sampling_params(args)  # a bad value names its field
    check_pixel_count("--max-pixels", args.max_pixels)  # the live session would take 0 for "default"
    if Path(args.video).is_dir():
        raise UserInputError(f"{args.video} is a directory, not a video file")
    if not Path(args.video).is_file():
        raise UserInputError(f"no such video file: {args.video}")
    with Progress(f"decoding {Path(args.video).name}"):
        clip = decode_video(args.video, fps=args.fps, min_frames=2, max_frames=10**7)  # MediaError on a bad file
    frames, stamps = clip.frames, [float(t) - float(clip.timestamps[0]) for t in clip.timestamps]
    print(f"stream: {args.video}: {len(frames)} frames {frames.shape[2]}x{frames.shape[1]} sampled at "
          f"{clip.sample_fps:.2f} fps over {clip.duration_s:.1f} s; speed {args.speed}")

    from omnistream.bench.models import resolve_dtype
    from omnistream.entrypoints.cli import engine_args, load_engine

    device, _, engine_options = engine_args(args)
    dtype = resolve_dtype(args.dtype, device)
    hf = None
    if args.compare:  # loaded first: the engine sizes its KV pool from the memory left free
        from omnistream.bench.native import load_native
        from omnistream.models.demo import ensure_demo_model

        model_dir = ensure_demo_model() if args.model == "demo" else Path(args.model)
        if not (model_dir / "config.json").is_file():
            raise ConfigError(f"{model_dir}: not a checkpoint directory (no config.json)")
        hf = load_native(model_dir, device, dtype)
    # closing the engine closes the live session and stops the loop thread before the process
    # exits (on Ctrl-C too): left running, it aborted the interpreter at shutdown
    with load_engine(args.model, device, str(dtype).replace("torch.", ""), **engine_options) as engine:
        live = engine.live_session(max_pixels=args.max_pixels, policy=args.policy)
        _play(args, engine, live, hf, frames, stamps, asks, sampling)
    return 0


def _play(args, engine, live, hf, frames, stamps, asks, sampling) -> None:
    real_time = args.speed == "1"
    start = time.perf_counter()
    fed = 0
    for t_ask, question in asks:
        while fed < len(frames) and stamps[fed] <= t_ask:
            if real_time:
                delay = start + stamps[fed] - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            live.add_frame(frames[fed], stamps[fed])
            fed += 1
        if real_time and t_ask <= stamps[-1]:  # the question comes at its time on the camera clock
            delay = start + t_ask - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        with Progress("ingesting frames"):
            live.flush(timeout=600)
        shown = min(t_ask, stamps[-1]) if t_ask > stamps[-1] else t_ask
        late = " (after the end of the video)" if t_ask > stamps[-1] else ""
        print(f"\n[t={shown:.1f}s{late}] frames so far {fed}; Q: {question}")
        exact = live.prompt_for(question) if hf is not None else None
        with Progress("answering"):
            res = live.ask(question, sampling)
        print(f"A: {res.text}")
        print_live_metrics(res)
        if hf is not None:
            _compare(engine, live, hf, frames[:fed], stamps[:fed], question, exact, res, sampling.max_new_tokens)


def _compare(engine, live, hf, frames, stamps, question, exact, res, new_tokens) -> None:
    from omnistream.bench.latency import prepare
    from omnistream.bench.native import native_answer, native_prepared, token_agreement

    tps = engine.model.cfg.vision.tokens_per_second
    h, w = live.size
    part = {"type": "video", "video": {"frames": list(frames), "timestamps": list(stamps)},
            "min_pixels": h * w, "max_pixels": h * w}
    p = prepare(engine, [{"role": "user", "content": [part, {"type": "text", "text": question}]}])
    all_frames = native_prepared(hf, p, new_tokens)
    ids, media = exact
    retained = native_answer(hf, ids, media, new_tokens, tps)
    n_retained = 2 * media[0][1].grid_thw[0]
    m = res.metrics
    ours = {"ttft_s": m.ttft_s, "total_s": res.live.total_latency}
    print_compare([
        (f"omnistream (live, {live.policy})", n_retained, m.prompt_tokens, ours, "-"),
        ("transformers, retained frames", n_retained, retained["prompt_tokens"], retained, token_agreement(res.token_ids, retained["tokens"])),
        ("transformers, all frames so far", len(frames), all_frames["prompt_tokens"], all_frames, token_agreement(res.token_ids, all_frames["tokens"])),
    ])


def add_stream_command(sub, add_run_args) -> None:
    p = sub.add_parser("stream", help="play a video file as a live camera and ask questions at given times",
                       description="Play a video file as a live camera (a LiveSession fed at the frames' timestamps) "
                                   "and ask questions at given times.")
    p.add_argument("video", help="the video file to play")
    p.add_argument("--speed", default="1", help="1: real time (default); max: as fast as possible")
    p.add_argument("--fps", type=float, default=2.0, help="frames sampled per second of video (default: 2)")
    p.add_argument("--max-pixels", type=int, default=None, help="largest frame area after resizing (default: the engine's video default)")
    p.add_argument("--ask", action="append", default=[], metavar="SECONDS:QUESTION",
                   help="ask QUESTION at SECONDS into the video (repeatable)")
    p.add_argument("--policy", choices=("exact", "fast"), default="exact",
                   help="live KV policy: exact (default; equals a fresh run over the retained frames) or fast "
                        "(evicted frames' KV removed in place, no recompute; --compare shows its divergence)")
    p.add_argument("--compare", action="store_true",
                   help="also answer natively with transformers over all frames so far and over the retained frames")
    add_run_args(p, max_new_tokens=64)
    p.set_defaults(func=cmd_stream)
