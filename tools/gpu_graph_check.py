"""GPU check of the CUDA-graph row path (3B, bf16): a video prompt whose whole prefill fits one
graph bucket (media rows inside the graph), and follow-ups of 60-250 new tokens, against the same
engine with CUDA graphs off. Prints first-token logit differences and TTFTs.
Usage: python3 tools/gpu_graph_check.py [NEW_TOKENS ...]"""
import sys

import numpy as np
import torch

from omnistream.engine.protocol import EngineRequest
from omnistream.bench.models import make_engine
from omnistream.engine.sampling import SamplingParams

sp = SamplingParams(max_new_tokens=4, ignore_eos=True)
# new text tokens after the video prompt (argv: e.g. 0 69 200 600 1000: the longer ones are
# chunks the row path takes only since graphs go to 1024 rows)
EXTRA = [int(a) for a in sys.argv[1:]] or [0, 69, 200]
rng = np.random.default_rng(0)
frames = [rng.integers(0, 255, (224, 224, 3), dtype=np.uint8) for _ in range(4)]
video = {"type": "video", "video": {"frames": frames, "timestamps": [0, 0.5, 1, 1.5]}, "max_pixels": 224 * 224}
out = {}
for graphs in (True, False):
    eng = make_engine("3b", "cuda", "auto", kv_cache_tokens=8192, cuda_graphs=graphs)
    s = eng.session()
    s.add_video(video["video"], max_pixels=224 * 224)
    base, media = s.prompt_for("What is shown?")
    tok = eng.tokenizer
    rows = []
    # the same token sequences on both engines (no generated history): A, then A + 69 / 200 text
    # tokens served from A's cached prefix, each with a few greedy decode steps
    for extra in EXTRA:
        ids = base + tok.encode(" colour" * extra)[:extra]
        [r] = eng.run([EngineRequest(ids, media, sp, return_logits=True)])
        rows.append((torch.stack(r.logits).float(), r.metrics.prompt_tokens - r.metrics.cached_tokens, r.metrics.ttft_s, r.token_ids))
    out[graphs] = rows
    del eng, s
    torch.cuda.empty_cache()
for (lg, n, t, tok), (le, _, te, toke) in zip(out[True], out[False]):
    rel = float((lg[0] - le[0]).norm() / le[0].norm())
    print(f"graph check: {n:4d} new tokens  first-token rel logit diff {rel:.2e}  top1 same {bool(lg[0].argmax() == le[0].argmax())}  "
          f"greedy {tok} vs {toke}  ttft graphs {1000 * t:.1f} ms  eager {1000 * te:.1f} ms")
    steps = min(len(lg), len(le))
    if tok[:steps - 1] == toke[:steps - 1]:  # decode steps saw the same tokens: compare them too
        worst = max(float((lg[i] - le[i]).norm() / le[i].norm()) for i in range(steps))
        print(f"graph check:      decode steps: worst rel logit diff {worst:.2e}")

# vision tower: graph replay == eager forward (same kernels), for two different inputs
from omnistream.engine.vision_graphs import VisionGraphs

eng = make_engine("3b", "cuda", "auto", kv_cache_tokens=8192)
vis = eng.model.visual
vg = VisionGraphs(vis)
grids = [(1, 32, 32)]
for seed in range(3):
    g = torch.Generator(device="cuda").manual_seed(seed)
    px = torch.randn(1024, 1176, device="cuda", generator=g).to(next(vis.parameters()).dtype)
    with torch.inference_mode():
        eager = vis(px, grids)
        out = vg.run(px, grids)
    if out is None:
        print(f"vision graph check: input {seed}: eager (first sighting)")
        continue
    print(f"vision graph check: input {seed}: max |graph - eager| {float((out.float() - eager.float()).abs().max()):.3e}, "
          f"rel {float((out.float() - eager.float()).norm() / eager.float().norm()):.2e}")
import time as _t
for label, fn in (("eager", lambda: vis(px, grids)), ("graph", lambda: vg.run(px, grids))):
    with torch.inference_mode():
        for _ in range(3):
            fn()
        torch.cuda.synchronize(); t0 = _t.perf_counter()
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
    print(f"vision graph check: one 448x448 patch {label}: {1000 * (_t.perf_counter() - t0) / 20:.2f} ms")
