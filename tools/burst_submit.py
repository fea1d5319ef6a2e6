"""When do the questions of a burst reach the engine? N sessions (demo model, CPU, ~1k-token
cached contexts) ask at the same moment, one thread each; prints when each request was sent
(Engine.send: queued for the engine loop) and when its start() returned, after the release:
first, median and last, in ms. With the engine in its own process unless --thread.
Usage: python3 tools/burst_submit.py [N] [--thread]"""

import statistics
import sys
import threading
import time

from omnistream.bench.text_prompts import SYSTEM, context_prompt, text_question
from omnistream.bench.models import make_engine
from omnistream.engine.sampling import SamplingParams

n = int(next((a for a in sys.argv[1:] if a.isdigit()), 32))
eng = make_engine("demo", "cpu", engine_process="--thread" not in sys.argv, kv_cache_tokens=n * 1400 + 4096, max_num_seqs=max(64, n))
sessions = [eng.session(system=SYSTEM) for _ in range(n)]
for k, s in enumerate(sessions):
    s.ask(context_prompt(eng.tokenizer, 1024, k), SamplingParams(max_new_tokens=2, ignore_eos=True))
sent: list[float] = []
_send = eng.send


def stamped_send(prepared):
    handle = _send(prepared)
    sent.append(time.perf_counter())
    return handle


eng.send = stamped_send
for rep in range(3):
    barrier, queued, answers = threading.Barrier(n + 1), [0.0] * n, [None] * n
    sent.clear()

    def client(k):
        barrier.wait()
        answers[k] = sessions[k].start(text_question(k, rep), SamplingParams(max_new_tokens=1, ignore_eos=True))
        queued[k] = time.perf_counter()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    ms = sorted(1000 * (q - t0) for q in queued)
    out = sorted(1000 * (q - t0) for q in sent)
    for a in answers:
        a.finish()
    print(f"rep {rep}: {n} questions after the release: sent first {out[0]:.1f} / median {statistics.median(out):.1f} / "
          f"last {out[-1]:.1f} ms; start() returned first {ms[0]:.1f} / median {statistics.median(ms):.1f} / last {ms[-1]:.1f} ms")
eng.close()
