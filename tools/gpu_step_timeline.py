"""Timeline of a burst (3B, in-thread engine): N sessions ask at the same moment, text follow-ups
over ~1k-token cached contexts (kind text) or a question over an 8-frame 448x448 clip (video8).
Prints every engine step until all have their first token: start ms after the release, host
ms, GPU ms (CUDA events around the step), rows, sequences, sequences sampled, graphed; then
TTFT percentiles, the wall and the step mix. Engine options as KEY=VALUE after the kind and N.
Each step also shows the SM clock read just before it (NVML, when nvidia-ml-py is there): the
first step of a burst took 25-38 ms for 40-65 rows on the H200 (later 1024-row steps 16.6 ms);
WARM=1 keeps the GPU busy for 0.3 s right before the release, to tell clocks that dropped in
the idle gap from a cold path of the engine.
Usage: [WARM=1] python3 tools/gpu_step_timeline.py KIND N [KEY=VALUE ...]"""

import ast
import os
import sys
import threading
import time

import numpy as np
import torch

from omnistream.bench.text_prompts import SYSTEM, context_prompt, text_question
from omnistream.bench.models import make_engine
from omnistream.bench.multiturn import add_clip, question
from omnistream.engine.sampling import SamplingParams

kind, n = sys.argv[1], int(sys.argv[2])
opts = {k: ast.literal_eval(v) if v[:1].isdigit() else v for k, v in (a.split("=", 1) for a in sys.argv[3:])}
eng = make_engine("3b", "cuda", "auto", kv_cache_tokens=200_000, max_num_seqs=max(64, n), **opts)
sp = SamplingParams(max_new_tokens=64, ignore_eos=True)
llm, runner = eng.llm, eng.llm.runner
log = []
step, launch = llm.step, runner.launch
try:
    import pynvml

    pynvml.nvmlInit()
    _gpu = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())

    def sm_clock() -> int | None:
        return pynvml.nvmlDeviceGetClockInfo(_gpu, pynvml.NVML_CLOCK_SM)
except Exception:  # noqa: BLE001 - no NVML: no clock column
    def sm_clock() -> int | None:
        return None


def timed_step():
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    mhz = sm_clock()
    t0 = time.perf_counter()
    a.record()
    r = step()
    b.record()
    log.append((t0, time.perf_counter(), r.num_rows, r.num_seqs, len(r.sampled), a, b, mhz))
    return r


def keep_busy(seconds: float) -> None:
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(20):
            x = (x @ x).clamp_(-1, 1)
        torch.cuda.synchronize()


graphed = []


def timed_launch(out, prev=None):
    graphed.append(runner.graphs is not None and runner.graphs.can_run(out))
    return launch(out, prev)


llm.step, runner.launch = timed_step, timed_launch


def setup(rep: int):
    sessions = [eng.session(system=SYSTEM) for _ in range(n)]
    for k, s in enumerate(sessions):
        if kind == "text":
            s.ask(context_prompt(eng.tokenizer, 1024, 10 * rep + k), SamplingParams(max_new_tokens=8, ignore_eos=True))
        else:
            add_clip(s, 8, 448, 1000 * rep + k)
    return sessions


for rep in range(2):
    sessions = setup(rep)
    barrier, res = threading.Barrier(n + 1), [None] * n

    def client(k):
        barrier.wait()
        q = text_question(k, k) if kind == "text" else question(k)
        res[k] = sessions[k].ask(q, sp)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    if os.environ.get("WARM") == "1":
        keep_busy(0.3)
    print(f"\nSM clock before the release: {sm_clock()} MHz")
    log.clear()
    graphed.clear()
    barrier.wait()
    t_rel = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_rel
    torch.cuda.synchronize()
    ttft = sorted(1000 * r.metrics.ttft_s for r in res)
    arrivals = sorted(1000 * (r.metrics.arrival - t_rel) for r in res)
    print(f"\nrep {rep} {kind} x{n} {opts}: {64 * n / wall:,.0f} tok/s, wall {1000 * wall:.1f} ms, arrivals {arrivals[0]:.1f}..{arrivals[-1]:.1f} ms, "
          f"TTFT p50 {np.median(ttft):.1f} p99 {ttft[-1]:.1f} ms, steps {len(log)}")
    last_first = max(r.metrics.first_token_at for r in res)
    for i, (a, b, rows, seqs, sampled, ea, eb, mhz) in enumerate(log):
        if a > last_first + 0.01 and i > 12:
            break
        g = graphed[i] if i < len(graphed) else None
        print(f"  step {i:3d} at {1000 * (a - t_rel):7.2f} ms  host {1000 * (b - a):6.2f}  gpu {ea.elapsed_time(eb):6.2f} ms  rows {rows:5d} "
              f"seqs {seqs:3d} sampled {sampled:3d} graph {g}  SM {mhz} MHz")
    durs = [1000 * (b - a) for a, b, *_ in log]
    print(f"  steps: {len(log)}, host median {np.median(durs):.2f} ms, sum {sum(durs):.1f} ms; launches graphed {sum(graphed)}/{len(graphed)}")
    for s in sessions:
        s.close()
eng.close()
