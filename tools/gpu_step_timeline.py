"""Timeline of a burst: N sessions ask text follow-ups over ~1k-token cached contexts at the
same moment (3B); prints every engine step of the timed burst (start ms after the release,
duration, rows, sequences, row-batch/graph or eager) until all have their first token, then
TTFT percentiles and the step mix. Usage: python3 tools/gpu_step_timeline.py [N]"""

import sys
import threading
import time

import numpy as np

from omnistream.bench.models import make_engine
from omnistream.engine.sampling import SamplingParams

n = int(sys.argv[1]) if len(sys.argv) > 1 else 32
print("switch interval", sys.getswitchinterval())
eng = make_engine("3b", "cuda", "auto", kv_cache_tokens=200_000)
sp = SamplingParams(max_new_tokens=64, ignore_eos=True)
llm, runner = eng.llm, eng.llm.runner
log = []
step, launch = llm.step, runner.launch


def timed_step():
    t0 = time.perf_counter()
    r = step()
    log.append((t0, time.perf_counter(), r.num_rows, r.num_seqs, len(r.sampled)))
    return r


graphed = []


def timed_launch(out, prev=None):
    graphed.append(runner.graphs is not None and runner.graphs.can_run(out))
    return launch(out, prev)


llm.step, runner.launch = timed_step, timed_launch
sessions = [eng.session() for _ in range(n)]
rng = np.random.default_rng(0)
for s in sessions:
    s.ask(" ".join(f"w{int(x)}" for x in rng.integers(0, 5000, 330)), SamplingParams(max_new_tokens=2))
for rep in range(2):
    barrier, res = threading.Barrier(n + 1), [None] * n

    def client(k):
        barrier.wait()
        res[k] = sessions[k].ask(f"Question {rep} for client {k}: what is w{k}?", sp)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    log.clear()
    graphed.clear()
    barrier.wait()
    t_rel = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_rel
    ttft = sorted(1000 * r.metrics.ttft_s for r in res)
    print(f"\nrep {rep}: {64 * n / wall:,.0f} tok/s, wall {1000 * wall:.1f} ms, TTFT p50 {np.median(ttft):.1f} p99 {ttft[-1]:.1f} ms, steps {len(log)}")
    last_first = max(r.metrics.first_token_at for r in res)
    for i, (a, b, rows, seqs, sampled) in enumerate(log):
        if a > last_first + 0.01 and i > 12:
            break
        print(f"  step {i:3d} at {1000 * (a - t_rel):7.2f} ms  {1000 * (b - a):6.2f} ms  rows {rows:5d} seqs {seqs:3d} sampled {sampled:3d}")
    durs = [1000 * (b - a) for a, b, *_ in log]
    print(f"  steps: {len(log)}, median {np.median(durs):.2f} ms, sum {sum(durs):.1f} ms; launches graphed {sum(graphed)}/{len(graphed)}")
print("switch interval", sys.getswitchinterval())
eng.close()
