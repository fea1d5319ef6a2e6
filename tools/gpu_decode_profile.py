"""Where a decode step's time goes (3B, random weights): for B rows over ~1k-token contexts,
wall ms per step, GPU kernel ms per step, and the kernels by total time per step.
Usage: python3 tools/gpu_decode_profile.py [B ...]"""

import collections
import sys
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from omnistream.bench.models import make_engine
from omnistream.engine.sampling import SamplingParams

NEW = 64
eng = make_engine("3b", "cuda", "auto", kv_cache_tokens=200_000)
sp = SamplingParams(max_new_tokens=NEW, ignore_eos=True)


def prompt(i: int) -> list[dict]:
    rng = np.random.default_rng(i)
    text = " ".join(f"w{int(x)}" for x in rng.integers(0, 5000, 330))
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


summary = []
for b in [int(a) for a in sys.argv[1:]] or [1, 32, 64]:
    convs = [prompt(1000 * b + i) for i in range(b)]
    eng.generate(convs, SamplingParams(max_new_tokens=4, ignore_eos=True))  # prefix cached, shapes warm
    eng.generate(convs, sp)
    before = eng.stats()["engine"]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = eng.generate(convs, sp)
    wall = time.perf_counter() - t0
    after = eng.stats()["engine"]
    steps = after["steps"] - before["steps"]
    itl = np.median([x for r in res for x in r.metrics.inter_token_s])
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        eng.generate(convs, sp)
        torch.cuda.synchronize()
    kern = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kern[e.name[:90]]
            k[0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            k[1] += 1
    gpu_us = sum(v[0] for v in kern.values())
    print(f"\n=== B={b}: {steps} steps, wall {1000 * wall / steps:.3f} ms/step, ITL p50 {1000 * itl:.3f} ms, "
          f"GPU kernels {gpu_us / 1000 / steps:.3f} ms/step (profiled run)")
    for name, (us, n) in sorted(kern.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"  {us / steps:8.1f} us/step  {n / steps:6.1f} launches/step  {name}")
    summary.append((b, 1000 * wall / steps, 1000 * itl, gpu_us / 1000 / steps))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=50))
print("\n   B  wall ms/step  ITL p50 ms  GPU ms/step")
for b, w, i, g in summary:
    print(f"{b:4d}  {w:11.3f}  {i:10.3f}  {g:11.3f}")
