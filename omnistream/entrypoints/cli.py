"""Command line: omnistream ask | demo | stream | serve | profile | bench.

User-input errors (a bad flag value included) print one line (`error: ...`) and exit 2; Ctrl-C
prints `interrupted` and exits 130, a SIGTERM to `serve` prints `terminated` and exits 143;
nothing else prints a traceback unless --debug is given.
`ask`, `demo`, `stream` and `serve` take every engine option and sampling parameter as a flag
(entrypoints/options.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from omnistream.entrypoints import options
from omnistream.entrypoints.engine_args import _add_model_args, add_run_args, engine_args, load_engine
from omnistream.entrypoints.progress import Progress
from omnistream.errors import OmnistreamError, Terminated, UserInputError

DESCRIPTION = """omnistream: multi-turn and live video question answering on Qwen2.5-VL and -Omni.

  omnistream demo                                   a question about a generated clip (random weights)
  omnistream ask clip.mp4 "What happens?" --model DIR
  omnistream ask speech.wav "What is said?" --model omni-demo        (a Qwen2.5-Omni model hears)
  omnistream ask clip.mp4 "Who speaks?" --audio-in-video --model omni-demo
  omnistream serve --model DIR                      OpenAI-compatible server on 127.0.0.1:8000

`omnistream COMMAND --help` lists a command's options."""

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a program ended by Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM, what docker and systemd expect of a stopped service

AUDIO_SUFFIXES = {".wav", ".mp3", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".aac"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".flv", ".ts", ".mpg", ".mpeg", ".ogv", ".3gp", ".gif"}


class OneLineErrorParser(argparse.ArgumentParser):
    """A bad flag or value ends in one `error: ...` line and exit 2, like every other user
    error of the CLI, not argparse's usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as installed

    try:
        return installed("omnistream")
    except PackageNotFoundError:  # a checkout on the path, not installed
        return "unknown (not installed)"


def _check_media_args(path: str, fps: float | None, nframes: int | None) -> None:
    from omnistream.errors import MediaError

    p = Path(path)
    if not p.exists():
        raise MediaError(f"media file not found: {path}")
    if p.is_dir():
        raise MediaError(f"{path} is a directory, not a media file")
    if fps is not None and not fps > 0:
        raise UserInputError(f"--fps must be positive, got {fps:g}")
    if nframes is not None:
        from omnistream.media.resize import FPS_MAX_FRAMES, FRAME_FACTOR, round_by_factor

        if not FRAME_FACTOR <= round_by_factor(nframes, FRAME_FACTOR) <= FPS_MAX_FRAMES:
            # checked here, before the model loads (the sampler said it after the load, unnamed)
            raise UserInputError(f"--nframes must round to an even count in [2, {FPS_MAX_FRAMES}], got {nframes}")


def media_part(path: str, fps: float | None, nframes: int | None, max_pixels: int | None,
               audio_in_video: bool = False) -> dict:
    """Chooses image, audio or video by extension (a still image answers through the image
    path, a sound file through the audio path); audio_in_video: a video's audio track too."""
    suffix = Path(path).suffix.lower()
    if suffix in AUDIO_SUFFIXES:
        if audio_in_video:
            raise UserInputError(f"--audio-in-video is for a video file; {Path(path).name} is audio (heard without it)")
        return {"type": "audio", "audio": path}
    if suffix in IMAGE_SUFFIXES:
        if audio_in_video:
            raise UserInputError(f"--audio-in-video is for a video file; {Path(path).name} is an image")
        part = {"type": "image", "image": path}
    else:  # a video, or an unknown extension: the video decoder decides and explains
        part = {"type": "video", "video": path, "fps": fps, "nframes": nframes}
        if audio_in_video:
            part["use_audio_in_video"] = True
    if max_pixels is not None:  # 0 is a (bad) request, not "unset": the processor refuses it
        part["max_pixels"] = max_pixels
    return part


def print_metrics(metrics, out=None) -> None:
    out = out or sys.stdout
    # (name, value, unit, digits): seconds to the 0.1 ms, rates and sizes to one decimal
    rows = [
        ("media decode", metrics.media_decode_s, "s", 4),
        ("resize/patchify", metrics.preprocess_s, "s", 4),
        ("vision encode", metrics.vision_encode_s, "s", 4),
        ("prefill", metrics.prefill_s, "s", 4),
        ("time to first token", metrics.ttft_s, "s", 4),
        ("decode", metrics.decode_tokens_per_s, "tok/s", 1),
        ("prompt tokens", metrics.prompt_tokens, "", 0),
        ("  of which media", metrics.media_tokens, "", 0),
        ("output tokens", metrics.output_tokens, "", 0),
        ("peak memory", metrics.peak_memory_bytes / 2**20, "MiB", 1),
    ]
    print("stage                    value", file=out)
    for name, value, unit, digits in rows:
        text = "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))
        print(f"{name:<22} {text:>9} {unit}", file=out)


def answer(engine, messages: list[dict], sampling):
    """engine.generate for one conversation, with progress bars for its long parts: decoding
    the media, the prefill (until the first token), the answer's tokens."""
    with Progress("decoding media"):
        request = engine.request_for(messages, sampling)
    handle = engine.submit(request)
    bar = Progress(f"prefill of {len(request.token_ids)} prompt tokens")
    first = True
    try:
        for delta in handle:
            if first:
                bar.close()
                bar, first = Progress("answer", total=sampling.max_new_tokens, unit="tok"), False
            bar.update(len(delta.token_ids))
    except BaseException:  # Ctrl-C included: the engine stops computing it
        handle.abort()
        raise
    finally:
        bar.close()
    return handle.result()


def cmd_ask(args) -> int:
    from omnistream.media.processor import check_pixel_count

    # arguments first: a bad value is reported before a model is loaded
    check_pixel_count("--max-pixels", args.max_pixels)
    sampling = options.sampling_params(args)
    device, dtype, engine_options = engine_args(args)
    _check_media_args(args.media, args.fps, args.nframes)
    part = media_part(args.media, args.fps, args.nframes, args.max_pixels, getattr(args, "audio_in_video", False))
    messages = [{"role": "user", "content": [part, {"type": "text", "text": args.question}]}]
    # closed before the process exits: a running loop thread aborted the interpreter at shutdown
    with load_engine(args.model, device, dtype, **engine_options) as engine:
        res = answer(engine, messages, sampling)
    print(f"answer: {res.text}")
    print_metrics(res.metrics)
    return 0


def cmd_demo(args) -> int:
    from omnistream.media.samples import write_sample_video

    # the sample lives as long as the run: removed on any exit, error and Ctrl-C included
    with tempfile.TemporaryDirectory(prefix="omnistream-demo-") as work:
        video = write_sample_video(Path(work) / "sample.mp4")
        print(f"demo: generated sample video {video.name} (4 s, 320x240; removed after the run)")
        args.media, args.question, args.fps, args.nframes, args.max_pixels = str(video), "What happens in this video?", 2.0, None, None
        return cmd_ask(args)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="omnistream", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"omnistream {version()}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    from omnistream.media.resize import FPS  # the processor's default rate

    ask = sub.add_parser("ask", help="answer one question about an image, video or audio file",
                         description="Answer one question about an image, a video or (Qwen2.5-Omni) an audio file.")
    ask.add_argument("media", help="an image, video or audio file (chosen by its extension; audio: "
                                   + ", ".join(sorted(s.lstrip(".") for s in AUDIO_SUFFIXES)) + ")")
    ask.add_argument("question")
    ask.add_argument("--fps", type=float, default=None, help=f"frames sampled per second of video (default: {FPS:g})")
    ask.add_argument("--nframes", type=int, default=None, help="sample this many frames instead, at most the clip's own (default: by --fps)")
    ask.add_argument("--max-pixels", type=int, default=None, help="largest image/frame area after resizing, in pixels (default: the processor's)")
    ask.add_argument("--audio-in-video", action="store_true",
                     help="also hear the video's audio track, interleaved with its frames (a Qwen2.5-Omni model)")
    add_run_args(ask, max_new_tokens=64)
    ask.set_defaults(func=cmd_ask)
    demo = sub.add_parser("demo", help="end-to-end example on a generated sample video",
                          description="Answer a question about a generated sample video (the demo model has random weights).")
    add_run_args(demo, max_new_tokens=32)
    demo.set_defaults(func=cmd_demo)
    from omnistream.entrypoints.stream_cli import add_stream_command

    add_stream_command(sub, add_run_args)
    from omnistream.entrypoints.serve_cli import add_serve_command

    add_serve_command(sub, add_run_args)
    from omnistream.bench.cli import add_bench_commands

    add_bench_commands(sub, _add_model_args)
    return p


def _compile_cache_out_of_tmp() -> None:
    """Importing torch._dynamo creates torch's compile cache, torchinductor_<user>, in the
    temp folder, so a run left a folder there; the CLI keeps it with omnistream's cache. An
    explicit TORCHINDUCTOR_CACHE_DIR wins; an unwritable cache folder leaves torch's default."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return
    from omnistream.models.demo import default_cache_dir

    cache = default_cache_dir() / "torchinductor"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)


def _command_prog(parser: argparse.ArgumentParser, argv: list[str]) -> str:
    """The prog of the (sub)command argv names: `omnistream bench serve`."""
    for token in argv:
        if token.startswith("-"):
            continue
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or token not in sub.choices:
            break
        parser = sub.choices[token]
    return parser.prog


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        _compile_cache_out_of_tmp()
        argv = sys.argv[1:] if argv is None else list(argv)
        parser = build_parser()
        argv = options.normalize_argv(argv)
        args, extra = parser.parse_known_args(argv)
        if extra:  # named by the subcommand's own help, where its flags are (not `omnistream --help`)
            parser.exit(2, f"error: unrecognized arguments: {' '.join(extra)} (see: {_command_prog(parser, argv)} --help)\n")
        logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return args.func(args)
    except OmnistreamError as e:
        if args is not None and args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # the user's (or the system's) own stop, not a fault: no traceback
        if args is not None and args.debug:
            raise
        terminated = isinstance(e, Terminated)
        print("terminated" if terminated else "interrupted", file=sys.stderr)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
