"""Where does a follow-up question's time go? cProfile of one ask on the 3B architecture."""
import cProfile, pstats, io, time
import torch
from omnistream.bench.models import make_engine
from omnistream.bench.workload import synthetic_video_frames
from omnistream.engine.sampling import SamplingParams

eng = make_engine("3b", "cuda", "auto", kv_cache_tokens=40000, encoder_cache_bytes=1 << 30)
s = eng.session()
frames = synthetic_video_frames(64, 448, 0)
s.add_video({"frames": frames, "timestamps": [i / 2 for i in range(64)]}, min_pixels=448 * 448, max_pixels=448 * 448)
sp = SamplingParams(max_new_tokens=4, ignore_eos=True)
for i in range(4):
    r = s.ask(f"Question number {i}: what happens?", sp)
    print(i, {k: round(v, 4) for k, v in r.metrics.items() if k in ("ttft_s", "prefill_s", "cached_tokens", "prompt_tokens")})
pr = cProfile.Profile()
pr.enable()
t0 = time.perf_counter()
r = s.ask("One more question: what colour is it?", sp)
pr.disable()
print("profiled ask", {k: round(v, 4) for k, v in r.metrics.items() if k in ("ttft_s", "prefill_s")}, "wall", round(time.perf_counter() - t0, 4))
buf = io.StringIO()
pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(45)
print(buf.getvalue()[:9000])
