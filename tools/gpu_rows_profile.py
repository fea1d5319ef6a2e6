"""TTFT of follow-up questions of N new text tokens over a ~5k-token cached live context (3B),
each N asked twice (first-time vs steady cost), then a profile of one eager N~200 step."""
import time

import torch
from torch.profiler import ProfilerActivity, profile

from omnistream.bench.models import make_engine
from omnistream.bench.stream import SceneFrames
from omnistream.engine.sampling import SamplingParams

SIZE, FPS = 448, 2.0
eng = make_engine("3b", "cuda", "auto", enable_prefix_caching=True, kv_cache_tokens=40000, encoder_cache_bytes=100 << 20)
sp = SamplingParams(max_new_tokens=1, ignore_eos=True)
cam = SceneFrames(SIZE, FPS)
live = eng.live_session(max_pixels=SIZE * SIZE, min_pixels=SIZE * SIZE)
fr, ts = cam.frames(0, 400)
live.add_frames(fr, ts)
live.flush()
live.ask("hello", sp)
for words in (4, 8, 30, 50, 80, 120, 200, 300, 450, 700, 1000, 50, 200, 450):
    q = " ".join(["cat"] * words) + "?"
    for rep in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = live.ask(q, sp)
        torch.cuda.synchronize()
        m = r.metrics
        print(f"words {words:5d} rep {rep}: new tokens {m['prompt_tokens'] - m['cached_tokens']:5d} ttft {1000 * m['ttft_s']:7.1f} ms "
              f"wall {1000 * (time.perf_counter() - t0):7.1f} ms")
q = " ".join(["dog"] * 200) + "?"
live.ask(q, sp)
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    r = live.ask(q, sp)
print("profiled new tokens", r.metrics.prompt_tokens - r.metrics.cached_tokens, "ttft", r.metrics.ttft_s)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))
prof.export_chrome_trace("/tmp/trace.json")
import os, shutil
if os.environ.get("OUT"):
    shutil.copy("/tmp/trace.json", os.path.join(os.environ["OUT"], "trace.json"))
