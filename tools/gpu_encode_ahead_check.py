"""Encode-ahead on the GPU (side stream, readiness-limited scheduling) against the in-step path:
several video/image questions at once beside text streams, demo architecture in float32 and 3B in
bf16; same greedy tokens, logits close. Exits 1 on a mismatch."""

import sys

import numpy as np
import torch

from omnistream.bench.models import make_engine
from omnistream.engine.sampling import SamplingParams

import os

DEV = os.environ.get("DEVICE", "cuda")
PRESETS = (("demo", "float32", 8, 112, 96), ("3b", "auto", 16, 448, 512))[: int(os.environ.get("PRESETS", 2))]
sp = SamplingParams(max_new_tokens=12, ignore_eos=True)


def convs(n_video: int, frames: int, size: int) -> list:
    out = []
    for i in range(n_video):
        rng = np.random.default_rng(i)
        vid = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(frames)]
        out.append([{"role": "user", "content": [{"type": "video", "video": {"frames": vid, "timestamps": [k / 2 for k in range(frames)]}},
                                                 {"type": "text", "text": f"What happens in clip {i}?"}]}])
    out += [[{"role": "user", "content": [{"type": "text", "text": " ".join(f"w{j}" for j in range(200 + 37 * i))}]}] for i in range(4)]
    return out


bad = 0
for preset, dtype, frames, size, budget in PRESETS:
    results = {}
    for ahead in (False, True):
        eng = make_engine(preset, DEV, dtype, 0, encode_ahead=ahead, max_num_batched_tokens=budget, kv_cache_tokens=60_000)
        cs = convs(4, frames, size)
        eng.generate(cs[:1], SamplingParams(max_new_tokens=2, ignore_eos=True))  # warm-up
        results[ahead] = eng.generate(cs, sp, return_logits=True)
        eng.close()
        del eng
        if DEV == "cuda":
            torch.cuda.empty_cache()
    for i, (a, b) in enumerate(zip(results[False], results[True])):
        la, lb = torch.stack(a.logits).float(), torch.stack(b.logits).float()
        rel = ((la - lb).norm(dim=-1) / la.norm(dim=-1)).max().item()
        same = a.token_ids == b.token_ids
        tol = 1e-3 if dtype == "float32" else 5e-2
        ok = rel < tol if dtype == "float32" else (rel < tol or same)
        bad += not ok
        print(f"{preset} request {i}: tokens equal {same}, logits max rel err {rel:.2e} {'ok' if ok else 'MISMATCH'}")
print("encode-ahead check:", "FAILED" if bad else "ok")
sys.exit(1 if bad else 0)
