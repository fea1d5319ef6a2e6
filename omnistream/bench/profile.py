"""`omnistream profile`: where the time of one video question goes, stage by stage.

Drives one request through our engine step by step (the same scheduler, runner, kernels and
CUDA graphs that `Engine.generate` uses) and times:
  frames (synthesis + load), resize/patchify, prompt build        host clocks
  vision: patch embed / window-attention blocks / full-attention    forward hooks on the vision
          blocks / merger, and the rest (copy, layout, rotary)      tower's modules (CUDA events)
  prefill (LLM, vision excluded), decode per token                  synchronised step clocks
after one warm-up request. --trace also exports a torch.profiler Chrome trace of a further run.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from omnistream.bench.flops import encoder_flops, matmul_peak_flops, prefill_flops
from omnistream.bench.latency import decode_floor, environment, measure_bandwidth
from omnistream.bench.models import make_engine, resolve_dtype
from omnistream.bench.workload import video_question, video_tokens
from omnistream.engine.protocol import EngineRequest
from omnistream.engine.sampling import SamplingParams
from omnistream.models.prompt import build_prompt

VISION_PARTS = ("vision: patch embed", "vision: window-attention blocks", "vision: full-attention blocks", "vision: merger")


class StageClock:
    """Time per stage from forward pre/post hooks: CUDA events on the GPU (nothing
    synchronises inside the forward), perf_counter on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.spans: dict[str, list] = defaultdict(list)  # stage -> [(start, end)]
        self.open: dict[str, object] = {}
        self.handles = []

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def attach(self, module: torch.nn.Module, stage: str) -> None:
        def start(_mod, _args):
            self.open[stage] = self._mark()

        def stop(_mod, _args, _out):
            self.spans[stage].append((self.open.pop(stage), self._mark()))

        self.handles += [module.register_forward_pre_hook(start), module.register_forward_hook(stop)]

    def attach_vision(self, visual) -> None:
        self.attach(visual.patch_embed, VISION_PARTS[0])
        for i, blk in enumerate(visual.blocks):
            self.attach(blk, VISION_PARTS[2] if i in visual.full_blocks else VISION_PARTS[1])
        self.attach(visual.merger, VISION_PARTS[3])

    def totals(self) -> dict[str, float]:
        """Seconds per stage (synchronises the device)."""
        if self.cuda:
            torch.cuda.synchronize()
            return {k: sum(a.elapsed_time(b) for a, b in v) / 1000 for k, v in self.spans.items()}
        return {k: sum(b - a for a, b in v) for k, v in self.spans.items()}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def profile_request(engine, frames: int, size: int, new_tokens: int, seed: int) -> dict:
    """One request, stage by stage -> {"stages": {name: s}, "decode_steps_s": [...], ...}."""
    dev = engine.device
    clock = StageClock(dev)
    clock.attach_vision(engine.model.visual)
    try:
        t0 = time.perf_counter()
        messages = video_question(frames, size, seed)
        t1 = time.perf_counter()
        items = engine.load_media(messages)
        t2 = time.perf_counter()
        prompt = build_prompt(engine.tokenizer, messages, items)
        media = [(r.offset, m) for r, m in zip(prompt.ranges, prompt.media)]
        spec = EngineRequest(prompt.token_ids, media, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
        t3 = time.perf_counter()
        with torch.profiler.record_function("request"):
            out = engine.submit(spec).result()
        vision = clock.totals()
    finally:
        clock.remove()
    m = out.metrics
    # the prompt's steps end with the first token; each later token is one decode step
    prefill_s, decode_steps = m.first_token_at - m.scheduled_at, m.inter_token_s
    vision_total = m.vision_encode_s
    stages = {
        "frames (synthesis + load)": (t1 - t0) + sum(m.decode_s for m in items),
        "resize/patchify": sum(m.preprocess_s for m in items),
        "hash": sum(m.hash_s for m in items),
        "prompt build": t3 - t2,
        "vision: copy, layout, rotary": max(0.0, vision_total - sum(vision.values())),
        **{k: vision.get(k, 0.0) for k in VISION_PARTS},
        "prefill (LLM)": max(0.0, prefill_s - vision_total),
        f"decode ({len(decode_steps)} steps)": sum(decode_steps),
    }
    rows = sum(m.pixel_values.shape[0] for m in items)  # the shapes are all it needs: no copy of the pixels
    work = {"vision_flops": encoder_flops(engine.model.media_encoder("video"), rows, items[0].pixel_values.shape[1],
                                          [m.grid_thw for m in items], dev, next(engine.model.parameters()).dtype),
            "prefill_flops": prefill_flops(engine.model.cfg.text, len(prompt.token_ids))}
    return {
        "stages": stages,
        "work": work,
        "vision_s": vision_total,
        "prefill_s": stages["prefill (LLM)"],
        "total_s": sum(stages.values()),
        "decode_ms_per_token": 1000 * sum(decode_steps) / len(decode_steps) if decode_steps else None,
        "decode_steps_s": decode_steps,
        "prompt_tokens": len(prompt.token_ids),
        "output_tokens": len(out.token_ids),
    }


def export_trace(engine, path: str, frames: int, size: int, new_tokens: int, seed: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        profile_request(engine, frames, size, new_tokens, seed)
    prof.export_chrome_trace(path)


def print_profile(r: dict, out=None) -> None:
    env, w = r["env"], r["workload"]
    where = env["gpu"] or f"CPU ({env['cpu']})"
    print(f"omnistream profile: {w['model']} {env['dtype']} on {where}; {w['frames']} frames {w['size']}x{w['size']} "
          f"({w['video_tokens']} video tokens, prompt {r['prompt_tokens']}), {r['output_tokens']} new tokens", file=out)
    print(f"{'stage':<34}{'s':>10}{'%':>8}", file=out)
    total = r["total_s"]
    for name, s in r["stages"].items():
        print(f"{name:<34}{s:>10.4f}{100 * s / total if total else 0:>8.1f}", file=out)
    print(f"{'total':<34}{total:>10.4f}{100.0:>8.1f}", file=out)
    w_, floor = r["work"], r["floor"]
    rate = lambda flops, sec: "n/a" if not sec else _flops(flops / sec) + "/s"  # noqa: E731
    print(f"vision {_flops(w_['vision_flops'])} at {rate(w_['vision_flops'], r['vision_s'])}, prefill "
          f"{_flops(w_['prefill_flops'])} at {rate(w_['prefill_flops'], r['prefill_s'])} "
          f"(matmul peak measured here: {_flops(floor['matmul_peak_flops_per_s'])}/s)", file=out)
    if r["decode_ms_per_token"] is not None:
        share = floor["decode_ms_per_token_with_kv"] / r["decode_ms_per_token"]
        print(f"decode per token: {r['decode_ms_per_token']:.3f} ms; floor {floor['decode_ms_per_token_with_kv']:.3f} ms "
              f"(weights + KV at {floor['context_tokens']} tokens / {floor['bandwidth_bytes_per_s'] / 1e12:.3f} TB/s measured "
              f"copy bandwidth): {100 * share:.0f}% of the bandwidth", file=out)


def cmd_profile(args) -> int:
    from omnistream.entrypoints.options import default_device

    device = default_device(args.device)
    model = args.model_config or ("demo" if args.model == "demo" else args.model)
    kv_tokens = video_tokens(args.frames, args.size) + args.new_tokens + 1024
    engine = make_engine(model, device, args.dtype, args.seed, kv_cache_tokens=kv_tokens)
    profile_request(engine, args.frames, args.size, args.new_tokens, args.seed + 1000)  # warm-up
    report = profile_request(engine, args.frames, args.size, args.new_tokens, args.seed)
    bandwidth, _ = measure_bandwidth(engine.device)
    report["floor"] = decode_floor(engine.model, bandwidth, report["prompt_tokens"] + args.new_tokens // 2)
    report["floor"]["matmul_peak_flops_per_s"] = matmul_peak_flops(engine.device, next(engine.model.parameters()).dtype)
    report["env"] = environment(engine.device, resolve_dtype(args.dtype, device))
    report["workload"] = {"model": str(model), "frames": args.frames, "size": args.size, "new_tokens": args.new_tokens,
                          "seed": args.seed, "video_tokens": video_tokens(args.frames, args.size)}
    print_profile(report)
    if args.trace:
        export_trace(engine, args.trace, args.frames, args.size, args.new_tokens, args.seed + 2000)
        print(f"wrote trace {args.trace}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _flops(x: float) -> str:
    """In the unit that reads (a tiny model's 0.004 GFLOP printed as 0.00 TFLOP)."""
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:.1f} {unit}"
    return f"{x:.0f} FLOP"
