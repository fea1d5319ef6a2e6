"""Sliced vision (ModelRunner.vision_steps, one block per next()) against the engine's usual
encode (vision graphs where they apply) on the GPU, 3B bf16, a 64-frame 448x448 clip in groups
of 16 patches: the embeddings' largest relative row error, and the time of a whole sliced
forward and of one block per group. Usage: python3 tools/gpu_slices_check.py
(MODEL=demo DEVICE=cpu: a smoke run on the CPU)"""

import os
import time

import torch

from omnistream.bench.models import make_engine
from omnistream.bench.workload import video_question
from omnistream.stepwise import drain, run_steps

DEVICE = os.environ.get("DEVICE", "cuda")
eng = make_engine(os.environ.get("MODEL", "3b"), DEVICE, "auto", 0, kv_cache_tokens=20_000)
sync = torch.cuda.synchronize if DEVICE.startswith("cuda") else (lambda: None)
runner = eng.llm.runner
groups = eng.load_media(video_question(64, 448, seed=3))  # one item: 32 temporal patches
with torch.inference_mode():
    whole = runner.run_vision_patches(groups)
    sync()
    t0 = time.perf_counter()
    for _ in range(3):
        whole = runner.run_vision_patches(groups)
    sync()
    t_whole = (time.perf_counter() - t0) / 3
    gen = runner.vision_steps(groups)
    sync()
    blocks = []
    while True:
        t0 = time.perf_counter()
        done, value = run_steps(gen, 1)
        sync()
        blocks.append(time.perf_counter() - t0)
        if done:
            break
    sliced, _ = value
err = max(((a - b).float().norm(dim=-1) / b.float().norm(dim=-1)).max().item()
          for pa, pb in zip(sliced, whole) for a, b in zip(pa, pb))
print(f"sliced vs usual encode: max relative row error {err:.2e} (bf16 eps 7.8e-3)")
print(f"usual encode {t_whole * 1000:.1f} ms; sliced, synchronised per piece: {sum(blocks) * 1000:.1f} ms in {len(blocks)} pieces, "
      f"median piece {sorted(blocks)[len(blocks) // 2] * 1000:.2f} ms, max {max(blocks) * 1000:.2f} ms")
eng.close()
