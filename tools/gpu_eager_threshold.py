"""Eager prefill of ~2.7k new tokens over a ~5.2k cached live context (3B): TTFT with the fused
kernels compiled at >= 512 rows (default) against eager fused ops at every size, alternated."""
import statistics
import torch
from omnistream.engine.protocol import EngineRequest
from omnistream.bench.models import make_engine
from omnistream.bench.stream import SceneFrames
from omnistream.engine.sampling import SamplingParams
from omnistream.layers import fused

eng = make_engine("3b", "cuda", "auto", enable_prefix_caching=True, kv_cache_tokens=40000, encoder_cache_bytes=100 << 20)
cam = SceneFrames(448, 2.0)
live = eng.live_session(max_pixels=448 * 448, min_pixels=448 * 448)
fr, ts = cam.frames(0, 400)
live.add_frames(fr, ts)
live.flush()
live.ask("hello", SamplingParams(max_new_tokens=1))
res = {512: [], 10**9: []}
for rep in range(8):
    for th in (512, 10**9):
        ids, media = live.prompt_for(f"{rep} {th} " + " ".join(["cat"] * 2650) + "?")  # new text: recomputed
        fused._COMPILE_MIN_ROWS = th
        [r] = eng.run([EngineRequest(ids, media, SamplingParams(max_new_tokens=1, ignore_eos=True))])
        res[th].append(r.metrics.ttft_s * 1000)
        assert r.metrics.cached_tokens > 4000, r.metrics
for th, v in res.items():
    print(f"eager threshold {th}: new tokens {len(ids) - 5136}, TTFT ms median {statistics.median(v[1:]):.1f} max {max(v[1:]):.1f} all {[round(x, 1) for x in v]}")
