"""Where a live session's time goes on the GPU (3B, 448x448): first-segment ingest, the flush of
2 new frames, and the question after them. Prints timings with syncs, then profiler tables."""
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from omnistream.bench.models import make_engine
from omnistream.bench.stream import SceneFrames
from omnistream.engine.sampling import SamplingParams

SIZE, FPS = 448, 2.0
eng = make_engine("3b", "cuda", "auto", enable_prefix_caching=True, kv_cache_tokens=26624, encoder_cache_bytes=100 << 20)
sp = SamplingParams(max_new_tokens=8, ignore_eos=True)
cam = SceneFrames(SIZE, FPS)


def sync():
    torch.cuda.synchronize()
    return time.perf_counter()


def first_segment(seed):
    """120 frames, CPU part (prefill off) then one prefix prefill, timed apart."""
    c = SceneFrames(SIZE, FPS, seed=seed)
    live = eng.live_session(max_pixels=SIZE * SIZE, min_pixels=SIZE * SIZE, prefill_on_arrival=False)
    fr, ts = c.frames(0, 120)
    t0 = sync()
    live.add_frames(fr, ts)
    live.flush()
    t1 = sync()
    item = live.video_item()
    t2 = sync()
    live._prefill_prefix()
    t3 = sync()
    print(f"first segment: cpu ingest {t1 - t0:.3f}s  materialize+item {t2 - t1:.3f}s  prefill prefix {t3 - t2:.3f}s "
          f"(patches {item.grid_thw[0]}, vision s {0.0:.3f})")
    live.close()


for s in (100, 101, 102):
    first_segment(s)

live = eng.live_session(max_pixels=SIZE * SIZE, min_pixels=SIZE * SIZE)
fed = 0
for _ in range(3):
    fr, ts = cam.frames(fed, 200)
    live.add_frames(fr, ts)
    live.flush()
    fed += 200
for i in range(6):
    live.ask("What is on screen?", sp)
    fr, ts = cam.frames(fed, 2)
    fed += 2
    t0 = sync()
    live.add_frames(fr, ts)
    live.flush()
    t1 = sync()
    r = live.ask("Describe the last few seconds.", sp)
    t2 = sync()
    m = r.metrics
    print(f"rep {i}: flush {1000 * (t1 - t0):.1f} ms  ask wall {1000 * (t2 - t1):.1f} ms  ttft {1000 * m['ttft_s']:.1f} ms "
          f"prompt {m['prompt_tokens']} cached {m['cached_tokens']} prefill_s {m['prefill_s']:.4f} vision {m['vision_encode_s']:.4f}")

# breakdown of the flush: the worker's pieces called inline
live2 = eng.live_session(max_pixels=SIZE * SIZE, min_pixels=SIZE * SIZE, prefill_on_arrival=False)
fr, ts = cam.frames(0, 600)
live2.add_frames(fr, ts)
live2.flush()
live2._prefill_prefix()
live2.ask("What is on screen?", sp)
for i in range(3):
    fr, ts = cam.frames(600 + 2 * i, 2)
    t0 = sync()
    for f, t in zip(fr, ts):
        live2._ingest(f, t)
    t1 = sync()
    item = live2.video_item()
    t2 = sync()
    live2._prefill_prefix()
    t3 = sync()
    r = live2.ask("What changed?", sp)
    t4 = sync()
    print(f"inline {i}: ingest {1000 * (t1 - t0):.1f}  item {1000 * (t2 - t1):.1f}  prefill prefix {1000 * (t3 - t2):.1f} "
          f"(vision {1000 * 0.0:.1f})  ask {1000 * (t4 - t3):.1f} ttft {1000 * r.metrics.ttft_s:.1f} "
          f"prompt {r.metrics.prompt_tokens} cached {r.metrics.cached_tokens}")

fr, ts = cam.frames(700, 2)
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    with record_function("ingest"):
        for f, t in zip(fr, ts):
            live2._ingest(f, t)
    with record_function("video_item"):
        live2.video_item()
    with record_function("prefill_prefix"):
        live2._prefill_prefix()
    with record_function("ask"):
        live2.ask("What changed?", sp)
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=60))
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
