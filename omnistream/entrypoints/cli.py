"""Command line: omnistream ask | demo | stream | profile | bench.

User-input errors print one line (`error: ...`) and exit 2; Ctrl-C prints `interrupted` and
exits 130; nothing else prints a traceback unless --debug is given.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from omnistream.errors import OmnistreamError

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a program ended by Ctrl-C

VIDEO_SUFFIXES = {".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".flv", ".ts", ".mpg", ".mpeg", ".ogv", ".3gp", ".gif"}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="checkpoint directory, or 'demo' (built-in random weights)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def _default_device(arg: str | None) -> str:
    if arg:
        return arg
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def media_part(path: str, fps: float | None, nframes: int | None, max_pixels: int | None) -> dict:
    """Chooses image or video by extension (a still image answers through the image path)."""
    suffix = Path(path).suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        part = {"type": "video", "video": path, "fps": fps, "nframes": nframes}
    elif suffix in {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}:
        part = {"type": "image", "image": path}
    else:  # unknown extension: let the video decoder decide and explain
        part = {"type": "video", "video": path, "fps": fps, "nframes": nframes}
    if max_pixels is not None:  # 0 is a (bad) request, not "unset": the processor refuses it
        part["max_pixels"] = max_pixels
    return part


class _DropRandomWeightsWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "RANDOM weights" not in record.getMessage()


@contextmanager
def _without_random_weights_warning():
    """Engine.from_pretrained logs a RANDOM-weights warning for library users; the CLI prints
    its own note instead (one notice, not two)."""
    logger, drop = logging.getLogger("omnistream.entrypoints.api"), _DropRandomWeightsWarning()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def load_engine(model: str, device: str, dtype: str):
    """Engine.from_pretrained, plus the one notice that a random-weight model answers nonsense."""
    from omnistream.entrypoints.api import Engine

    with _without_random_weights_warning():
        engine = Engine.from_pretrained(model, device=device, dtype=dtype)
    if engine.random_weights:
        print(f"note: {engine.model_dir} holds RANDOM weights: answers are meaningless text", file=sys.stderr)
    return engine


def print_metrics(metrics, out=None) -> None:
    out = out or sys.stdout
    rows = [
        ("media decode", metrics.media_decode_s, "s"),
        ("resize/patchify", metrics.preprocess_s, "s"),
        ("vision encode", metrics.vision_encode_s, "s"),
        ("prefill", metrics.prefill_s, "s"),
        ("time to first token", metrics.ttft_s, "s"),
        ("decode", metrics.decode_tokens_per_s, "tok/s"),
        ("prompt tokens", metrics.prompt_tokens, ""),
        ("  of which media", metrics.media_tokens, ""),
        ("output tokens", metrics.output_tokens, ""),
        ("peak memory", metrics.peak_memory_bytes / 2**20, "MiB"),
    ]
    print("stage                    value", file=out)
    for name, value, unit in rows:
        text = "-" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
        print(f"{name:<22} {text:>9} {unit}", file=out)


def cmd_ask(args) -> int:
    from omnistream.engine.sampling import SamplingParams
    from omnistream.media.processor import check_pixel_count

    # arguments first: a bad value is reported before a model is loaded
    check_pixel_count("--max-pixels", args.max_pixels)
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens)
    messages = [{"role": "user", "content": [media_part(args.media, args.fps, args.nframes, args.max_pixels), {"type": "text", "text": args.question}]}]
    # closed before the process exits: a running loop thread aborted the interpreter at shutdown
    with load_engine(args.model, _default_device(args.device), args.dtype) as engine:
        [res] = engine.generate([messages], sampling)
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
    p = argparse.ArgumentParser(prog="omnistream", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    ask = sub.add_parser("ask", help="answer one question about an image or video")
    ask.add_argument("media")
    ask.add_argument("question")
    ask.add_argument("--fps", type=float, default=None)
    ask.add_argument("--nframes", type=int, default=None)
    ask.add_argument("--max-pixels", type=int, default=None)
    ask.add_argument("--max-new-tokens", type=int, default=64)
    _add_model_args(ask)
    ask.set_defaults(func=cmd_ask)
    demo = sub.add_parser("demo", help="end-to-end example on a generated sample video")
    demo.add_argument("--max-new-tokens", type=int, default=32)
    _add_model_args(demo)
    demo.set_defaults(func=cmd_demo)
    from omnistream.entrypoints.stream_cli import add_stream_command

    add_stream_command(sub, _add_model_args)
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


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        _compile_cache_out_of_tmp()
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return args.func(args)
    except OmnistreamError as e:
        if args is not None and args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the user's own stop, not a fault: no traceback
        if args is not None and args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
