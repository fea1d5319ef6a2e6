"""Registers `omnistream profile` and `omnistream bench ...` (filled in by bench modules).

Bench modules are imported only when their command runs (they pull in transformers)."""

from __future__ import annotations

import argparse

from omnistream.models.hf_config import PRESETS


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_workload_args(p: argparse.ArgumentParser, add_model_args, frames: int, size: int, new_tokens: int) -> None:
    add_model_args(p)
    p.add_argument("--model-config", choices=sorted(PRESETS), default=None,
                   help="random-weight model of this architecture, built on the device (wins over --model)")
    p.add_argument("--frames", type=_positive, default=frames, help="frames of the generated video (2 fps)")
    p.add_argument("--size", type=_positive, default=size, help="frame side in px (multiple of 28; frames are not resized)")
    p.add_argument("--new-tokens", type=int, default=new_tokens, help="greedy tokens to generate (>= 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the clip")
    p.add_argument("--json", default=None, help="write all raw numbers and the environment to this file")


def _run(name: str):
    def run(args) -> int:
        if args.new_tokens < 2:
            raise SystemExit("error: --new-tokens must be >= 2 (decode time needs two tokens)")
        if name == "accuracy":
            from omnistream.bench.accuracy import run_accuracy

            run_accuracy(args)
            return 0
        if name == "latency":
            from omnistream.bench.latency import cmd_latency

            return cmd_latency(args)
        from omnistream.bench.profile import cmd_profile

        return cmd_profile(args)

    return run


def add_bench_commands(sub, add_model_args) -> None:
    prof = sub.add_parser("profile", help="stage breakdown of one video question on our engine")
    _add_workload_args(prof, add_model_args, frames=64, size=448, new_tokens=32)
    prof.add_argument("--trace", default=None, help="also export a torch.profiler Chrome trace here")
    prof.set_defaults(func=_run("profile"))

    bench = sub.add_parser("bench", help="benchmarks: omnistream vs transformers on the same inputs")
    bsub = bench.add_subparsers(dest="bench_cmd", required=True)
    lat = bsub.add_parser("latency", help="vision encode, TTFT, decode ms/token, peak memory vs transformers")
    _add_workload_args(lat, add_model_args, frames=64, size=448, new_tokens=64)
    lat.add_argument("--repeats", type=_positive, default=3, help="measured requests per system (median)")
    lat.add_argument("--tuned", choices=("auto", "on", "off"), default="auto",
                     help="transformers with static cache + torch.compile (auto: on CUDA only)")
    lat.set_defaults(func=_run("latency"))
    acc = bsub.add_parser("accuracy", help="engine (bf16) vs transformers float32, against transformers' own bf16 error")
    _add_workload_args(acc, add_model_args, frames=16, size=448, new_tokens=64)
    acc.set_defaults(func=_run("accuracy"))
