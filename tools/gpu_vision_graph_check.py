"""Vision-tower CUDA graphs (engine/vision_graphs.py) on the GPU, 3B tower, random weights: a
replay equals the eager forward bit for bit for a 2-frame patch (1, 32, 32) and an 8-frame
clip (4, 32, 32) at 448x448; prints eager and replay ms. Usage: python3 tools/gpu_vision_graph_check.py"""

import time

import torch

from omnistream.bench.models import preset_model
from omnistream.engine.vision_graphs import VisionGraphs

model = preset_model("3b", 0, device="cuda", dtype=torch.bfloat16)
visual = model.media_encoder("video")
graphs = VisionGraphs(visual)


def ms(fn, reps=10):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0) / reps, out


with torch.inference_mode():
    for grid in ((1, 32, 32), (4, 32, 32)):
        n = grid[0] * grid[1] * grid[2]
        pixels = torch.randn(n, 1176, device="cuda", dtype=torch.bfloat16)
        layout = visual.layout([grid], pixels.device)
        eager_ms, eager = ms(lambda: visual(pixels, [grid], layout))
        assert graphs.run(pixels, [grid]) is None  # first sighting: eager
        replay_ms, replay = ms(lambda: graphs.run(pixels, [grid]))
        assert replay is not None, "not captured"
        print(f"grid {grid}: {n} patches, eager {eager_ms:.2f} ms, replay {replay_ms:.2f} ms, bit-identical {torch.equal(eager, replay)}")
