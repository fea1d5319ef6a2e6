"""GPU smoke of the engine core: N concurrent sessions asking text follow-ups over ~1k-token
contexts (3B architecture, random weights); prints aggregate tokens/s, TTFT p50/p99, mean
sequences per step. Usage: python3 tools/gpu_core_check.py [N ...]"""

import statistics
import sys
import threading
import time

import numpy as np

from omnistream.bench.models import make_engine
from omnistream.engine.sampling import SamplingParams

NEW = 64
eng = make_engine("3b", "cuda", "auto", kv_cache_tokens=200_000)
sp = SamplingParams(max_new_tokens=NEW, ignore_eos=True)


def context(i: int) -> str:
    rng = np.random.default_rng(i)
    return " ".join(f"w{int(x)}" for x in rng.integers(0, 5000, 330))  # ~1k tokens


for n in [int(a) for a in sys.argv[1:]] or [1, 32, 64]:
    sessions = [eng.session() for _ in range(n)]
    for s in sessions:  # the cached context (untimed)
        s.ask(context(len(sessions) * 1000 + id(s) % 997), SamplingParams(max_new_tokens=2))
    for rep in range(2):  # rep 0 warms the batch shapes
        barrier, res = threading.Barrier(n + 1), [None] * n

        def client(k):
            barrier.wait()
            res[k] = sessions[k].ask(f"Question {rep} for client {k}: what is w{k}?", sp)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(n)]
        for t in threads:
            t.start()
        before = eng.stats()["engine"]
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        after = eng.stats()["engine"]
        ttft = sorted(r.metrics.ttft_s for r in res)
        itl = [x for r in res for x in r.metrics.inter_token_s]
        toks = sum(len(r.token_ids) for r in res)
        seqs = (after["seqs"] - before["seqs"]) / max(1, after["steps"] - before["steps"])
        print(f"core check n={n:3d} rep={rep}: {toks / wall:8.0f} tok/s  TTFT p50 {1000 * statistics.median(ttft):6.1f} ms "
              f"p99 {1000 * ttft[min(n - 1, int(0.99 * n))]:6.1f} ms  ITL p50 {1000 * statistics.median(itl):5.2f} ms "
              f"p99 {1000 * np.percentile(itl, 99):5.2f} ms  mean seqs/step {seqs:5.1f}  cached {res[0].metrics.cached_tokens}"
              f"/{res[0].metrics.prompt_tokens}", flush=True)
    for s in sessions:
        s.close()
eng.close()
