"""Engine steps while a 64-frame clip is encoded beside 16 text streams (bench concurrency's
interference run, 3B): per step its duration, rows, sequences, vision ms, and whether it replayed
a graph; then the distribution. Usage: [SLICE=ROWS] python3 tools/gpu_interference_timeline.py
(SLICE: the engine's vision_slice_rows, engine/encode_ahead.py "Sliced")"""

import os
import time

import numpy as np

from omnistream.bench.interference import run_interference_once
from omnistream.bench.models import make_engine

SLICE = {"vision_slice_rows": int(os.environ["SLICE"])} if os.environ.get("SLICE") else {}
eng = make_engine("3b", "cuda", "auto", 0, kv_cache_tokens=60_000, max_num_seqs=64, **SLICE)
llm, runner = eng.llm, eng.llm.runner
log: list[tuple] = []
step, launch = llm.step, runner.launch
graphed: list[bool] = []


def timed_step():
    t0 = time.perf_counter()
    n = len(graphed)
    s0 = llm.ahead.slices if llm.ahead else 0
    r = step()
    g = graphed[n] if len(graphed) > n else None
    log.append((t0, time.perf_counter(), r.num_rows, r.num_seqs, runner.last_vision_s, g, len(graphed) - n,
                (llm.ahead.slices if llm.ahead else 0) - s0))
    return r


def timed_launch(out, prev=None):
    graphed.append(runner.graphs is not None and runner.graphs.can_run(out))
    return launch(out, prev)


llm.step, runner.launch = timed_step, timed_launch
run_interference_once(eng, 2, 16, 64, 448, 1024, 64, 99, with_clip=True)  # warm-up
log.clear()
row = run_interference_once(eng, 16, 128, 64, 448, 1024, 64, 7, with_clip=True)
clip = row["clip"]
print(f"clip TTFT {clip['ttft_s'] * 1000:.1f} ms, vision {clip['vision_encode_s'] * 1000:.1f}, prefill {clip['prefill_s'] * 1000:.1f}; "
      f"ITL window p50/p99 {row['itl_window_p50_s'] * 1000:.2f}/{row['itl_window_p99_s'] * 1000:.2f} ms; vision graph replays {runner.vision_graphs.replays}")
t_first = log[0][0]
durs = []
for i, (a, b, rows, seqs, vis, g, launches, sliced) in enumerate(log):
    durs.append((b - a) * 1000)
    if rows > seqs or vis or sliced:
        print(f"  step {i:4d} at {1000 * (a - t_first):8.2f} ms {1000 * (b - a):6.2f} ms rows {rows:4d} seqs {seqs:3d} "
              f"vision {vis * 1000:6.2f} ms graph {g} launches {launches} encoder slice {sliced}")
print(f"steps {len(log)}, median {np.median(durs):.2f} ms, p99 {np.percentile(durs, 99):.2f} ms")
eng.close()
