"""The flags every command that runs the engine takes (model, device, dtype, then the engine's
and the sampling's, derived from their dataclasses by entrypoints/options.py), and the engine
loaded from them: `ask`, `demo`, `stream` and `serve` share these.
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import contextmanager

from omnistream.entrypoints import options
from omnistream.entrypoints.progress import Progress


def _add_model_args(p: argparse.ArgumentParser, model_default: str | None = "demo") -> None:
    models = "a built-in random-weight model: 'demo' (Qwen2.5-VL) or 'omni-demo' (Qwen2.5-Omni: hears audio)"
    shown = "default: demo" if model_default == "demo" else "required: the server loads no model by default"
    p.add_argument("--model", default=model_default, help=f"checkpoint directory, or {models} ({shown})")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto (bfloat16 on a GPU, float32 on the CPU; the default)")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def add_run_args(p: argparse.ArgumentParser, model_default: str | None = "demo", sampling_title: str = "sampling options",
                 sampling_shown: dict[str, str] | None = None, engine_shown: dict[str, str] | None = None,
                 **sampling_defaults) -> None:
    """Model, engine and sampling flags: what every command that runs the engine takes."""
    _add_model_args(p, model_default)
    options.add_engine_args(p, engine_shown)
    options.add_sampling_args(p, sampling_title, sampling_shown, **sampling_defaults)


class _DropRandomWeightsWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "RANDOM weights" not in record.getMessage()


@contextmanager
def without_random_weights_warning():
    """Engine.from_pretrained logs a RANDOM-weights warning for library users; the CLI prints
    its own note instead (one notice, not two)."""
    logger, drop = logging.getLogger("omnistream.entrypoints.api"), _DropRandomWeightsWarning()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def engine_args(args) -> tuple[str, str, dict]:
    """-> (device, dtype, engine options) from the flags, validated before a model is loaded."""
    device = options.default_device(args.device)
    opts = options.engine_options(args)
    options.check_engine_options(device, args.dtype, opts)
    return device, args.dtype, opts


def load_engine(model: str, device: str, dtype: str, notice: bool = True, **engine_options):
    """Engine.from_pretrained, plus the one notice that a random-weight model answers nonsense
    (notice=False: the caller announces it itself)."""
    from omnistream.entrypoints.api import Engine

    with without_random_weights_warning(), Progress(f"loading model {model}"):
        engine = Engine.from_pretrained(model, device=device, dtype=dtype, **engine_options)
    if engine.random_weights and notice:
        print(f"note: {engine.model_dir} holds RANDOM weights: answers are meaningless text", file=sys.stderr)
    return engine
