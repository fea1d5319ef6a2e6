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

--audio (a Qwen2.5-Omni model) also feeds the file's audio track (decoded to 16 kHz mono once)
to the session with LiveSession.add_audio, on the frames' clock: before each frame, the sound
since the previous one (timestamp: its first sample, in seconds on the same clock as the frame
timestamps), and before each question the sound up to the question's time.
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


class AudioTrack:
    """A file's audio track cut into pieces on the frames' clock: `until(t)` returns the samples
    from where the last piece ended up to time t (and the piece's start time), or None when
    less than `min_samples` are due (they wait for the next piece; a short tail is dropped)."""

    def __init__(self, samples, sampling_rate: int, start_s: float = 0.0, min_samples: int = 480) -> None:
        self.samples, self.rate, self.start_s, self.min_samples = samples, sampling_rate, start_s, min_samples
        self.fed = 0  # samples handed out so far

    def until(self, t: float):
        end = min(len(self.samples), max(0, round((t - self.start_s) * self.rate)))
        if end - self.fed < self.min_samples:
            return None
        piece, ts = self.samples[self.fed:end], self.start_s + self.fed / self.rate
        self.fed = end
        return piece, ts

    @property
    def seconds_fed(self) -> float:
        return self.fed / self.rate


def _audio_track(args, clip):
    """The video file's audio track on the frames' clock (its first frame is time 0)."""
    from omnistream.media.audio import decode_audio

    with Progress(f"decoding the audio of {Path(args.video).name}"):
        audio = decode_audio(args.video)  # MediaError: no audio stream, undecodable, too long
    print(f"stream: audio track {audio.duration_s:.1f} s, fed with the frames")
    return AudioTrack(audio.samples, audio.sampling_rate, start_s=-float(clip.timestamps[0]))


def _check_hears(model: str) -> None:
    """Before the clip's audio is decoded and the model loaded: its config names an audio
    encoder (a clip without sound said `no audio stream` first, the more useful error second)."""
    from omnistream.models.builtin import builtin_model_dir
    from omnistream.models.registry import resolve

    model_dir = builtin_model_dir(model)
    if getattr(resolve(model_dir).read_config(model_dir), "audio", None) is None:
        raise UserInputError(f"--audio: {Path(model_dir).name} does not take audio "
                             "(a Qwen2.5-Omni checkpoint does, e.g. --model omni-demo)")


def cmd_stream(args) -> int:
    from omnistream.media.processor import check_pixel_count
    from omnistream.media.video import decode_video

    asks = sorted((parse_ask(a) for a in args.ask), key=lambda x: x[0])
    if not asks:
        raise ConfigError("give at least one --ask SECONDS:QUESTION")
    if args.speed not in ("1", "max"):
        raise ConfigError(f"--speed is 1 (real time) or max, got {args.speed!r}")
    if args.audio and args.compare:
        raise ConfigError("--compare answers over frames only (transformers' Qwen2.5-VL); leave out --audio or --compare")
    sampling = options.sampling_params(args)  # a bad value names its field
    check_pixel_count("--max-pixels", args.max_pixels)  # the live session would take 0 for "default"
    if args.audio:
        _check_hears(args.model)
    if Path(args.video).is_dir():
        raise UserInputError(f"{args.video} is a directory, not a video file")
    if not Path(args.video).is_file():
        raise UserInputError(f"no such video file: {args.video}")
    with Progress(f"decoding {Path(args.video).name}"):
        clip = decode_video(args.video, fps=args.fps, min_frames=2, max_frames=10**7)  # MediaError on a bad file
    frames, stamps = clip.frames, [float(t) - float(clip.timestamps[0]) for t in clip.timestamps]
    print(f"stream: {args.video}: {len(frames)} frames {frames.shape[2]}x{frames.shape[1]} sampled at "
          f"{clip.sample_fps:.2f} fps over {clip.duration_s:.1f} s; speed {args.speed}")
    track = _audio_track(args, clip) if args.audio else None

    from omnistream.bench.models import resolve_dtype
    from omnistream.entrypoints.engine_args import engine_args, load_engine

    device, _, engine_options = engine_args(args)
    dtype = resolve_dtype(args.dtype, device)
    hf = None
    if args.compare:  # loaded first: the engine sizes its KV pool from the memory left free
        from omnistream.bench.native import load_native
        from omnistream.models.builtin import builtin_model_dir

        model_dir = builtin_model_dir(args.model)
        if not (model_dir / "config.json").is_file():
            raise ConfigError(f"{model_dir}: not a checkpoint directory (no config.json)")
        hf = load_native(model_dir, device, dtype)
    # closing the engine closes the live session and stops the loop thread before the process
    # exits (on Ctrl-C too): left running, it aborted the interpreter at shutdown
    with load_engine(args.model, device, str(dtype).replace("torch.", ""), **engine_options) as engine:
        live = engine.live_session(max_pixels=args.max_pixels, policy=args.policy)
        _play(args, engine, live, hf, frames, stamps, asks, sampling, track)
    return 0


def _feed_audio(live, track: AudioTrack | None, t: float) -> None:
    piece = track.until(t) if track is not None else None
    if piece is not None:
        live.add_audio(piece[0], piece[1], track.rate)


def _play(args, engine, live, hf, frames, stamps, asks, sampling, track: AudioTrack | None = None) -> None:
    real_time = args.speed == "1"
    start = time.perf_counter()
    fed = 0
    for t_ask, question in asks:
        while fed < len(frames) and stamps[fed] <= t_ask:
            if real_time:
                delay = start + stamps[fed] - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            _feed_audio(live, track, stamps[fed])  # the sound heard since the previous frame
            live.add_frame(frames[fed], stamps[fed])
            fed += 1
        if real_time and t_ask <= stamps[-1]:  # the question comes at its time on the camera clock
            delay = start + t_ask - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        _feed_audio(live, track, t_ask)  # and up to the question (after the end: the whole track)
        with Progress("ingesting frames"):
            live.flush(timeout=600)
        shown = min(t_ask, stamps[-1]) if t_ask > stamps[-1] else t_ask
        late = " (after the end of the video)" if t_ask > stamps[-1] else ""
        heard = f"; audio so far {track.seconds_fed:.1f} s" if track is not None else ""
        print(f"\n[t={shown:.1f}s{late}] frames so far {fed}{heard}; Q: {question}")
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
    p.add_argument("--audio", action="store_true",
                   help="also feed the file's audio track to the session on the frames' clock (a Qwen2.5-Omni model)")
    p.add_argument("--compare", action="store_true",
                   help="also answer natively with transformers over all frames so far and over the retained frames")
    add_run_args(p, max_new_tokens=64)
    p.set_defaults(func=cmd_stream)
