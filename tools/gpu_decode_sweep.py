"""Launch parameters of the paged decode kernel (layers/triton_decode.py) on this GPU: us per
call and achieved KV bandwidth for 3B shapes (16 q heads, 2 kv heads, D 128) at the row counts
and contexts of decode steps. Usage: python3 tools/gpu_decode_sweep.py"""

import itertools

import torch

from omnistream.layers.triton_decode import triton_paged_decode

dev, dt = "cuda", torch.bfloat16
H, KVH, D, BS, BLOCKS = 16, 2, 128, 16, 40000
kc = torch.randn(BLOCKS, BS, KVH, D, device=dev, dtype=dt)
vc = torch.randn_like(kc)


def time_us(fn, reps=50):
    for _ in range(3):
        fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    g.replay()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / reps


for rows, ctx in ((1, 1100), (1, 8192), (32, 1100), (64, 1100), (128, 1100), (256, 1100)):
    tables = torch.randperm(BLOCKS, device=dev, dtype=torch.int32)[: rows * 2048 % BLOCKS or 2048]
    tables = torch.randint(0, BLOCKS, (rows, 2048), device=dev, dtype=torch.int32)
    lens = torch.full((rows,), ctx, device=dev, dtype=torch.int32)
    q = torch.randn(rows, H, D, device=dev, dtype=dt)
    kv_bytes = rows * ctx * KVH * D * 2 * 2
    res = []
    for tile, warps, stages, splits in itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3, 4), (None, 1, 2, 4, 8, 16, 32, 64, 128)):
        if tile == 128 and warps == 2:
            continue
        try:
            us = time_us(lambda: triton_paged_decode(q, kc, vc, tables, lens, D**-0.5, tile=tile, num_warps=warps, num_stages=stages, splits=splits))
        except Exception as e:  # noqa: BLE001 - out of shared memory etc.
            continue
        res.append((us, tile, warps, stages, splits))
    res.sort()
    default = [r for r in res if r[1:] == (64, 4, 3, None)]
    print(f"rows {rows:3d} ctx {ctx:5d}: default {default[0][0]:7.1f} us ({kv_bytes / default[0][0] / 1e6:5.2f} TB/s)")
    for us, tile, warps, stages, splits in res[:5]:
        print(f"   {us:7.1f} us ({kv_bytes / us / 1e6:5.2f} TB/s)  tile {tile:3d} warps {warps} stages {stages} splits {splits}")
