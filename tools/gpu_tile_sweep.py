"""The tiled row kernel (layers/triton_decode.triton_paged_tiles: rows of short chunks sharing a
pass over their context) over its launch parameters, on the shapes a 256-row graph step sees:
one 240-row chunk over a long context beside 16 decodes (a clip's prefill while others stream),
and a burst of 32 follow-ups of 8 rows over ~1k contexts. 3B heads (16 q / 2 kv, D 128).
Prints us per layer call and x36 per step, max abs error against the torch reference."""

import itertools

import torch
import triton

from omnistream.layers.attention import row_layout, row_tiles
from omnistream.layers.paged_decode import torch_paged_decode
from omnistream.layers.triton_decode import triton_paged_tiles

torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
H, KVH, D, BS, BLOCKS = 16, 2, 128, 16, 8192
kc = torch.randn(BLOCKS, BS, KVH, D, device=dev, dtype=dt)
vc = torch.randn(BLOCKS, BS, KVH, D, device=dev, dtype=dt)


def scenario(qlens: list[int], starts: list[int]):
    width = max(s + n for s, n in zip(starts, qlens)) // BS + 1
    seq_tables = torch.randint(0, BLOCKS, (len(qlens), width), dtype=torch.int32)
    tables, lens = row_layout(seq_tables, starts, qlens)
    q = torch.randn(len(lens), H, D, device=dev, dtype=dt)
    return qlens, tables.to(dev), lens.to(dev), q


cases = {f"240 rows @ {c} + 16 decodes": scenario([240] + [1] * 16, [c] + [1100] * 16) for c in (1000, 4000, 8000)}
cases["32 x 8 rows @ 1k"] = scenario([8] * 32, [1000 + 7 * i for i in range(32)])


def timed(fn, n=50) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1000 / n  # us


configs = [(8, 64, 4, 2)] + [c for c in itertools.product((8, 16, 32), (32, 64, 128), (4, 8), (2, 3)) if c != (8, 64, 4, 2)]
refs = {name: torch_paged_decode(q.float(), kc.float(), vc.float(), t, l, D**-0.5) for name, (_, t, l, q) in cases.items()}
rows_out = []
for rows, tile_n, warps, stages in configs:
    res = []
    for name, (qlens, t, l, q) in cases.items():
        tiles = row_tiles(qlens, rows).to(dev)
        fn = lambda: triton_paged_tiles(q, kc, vc, t, l, D**-0.5, tiles, num_warps=warps, rows=rows, tile_n=tile_n, num_stages=stages)
        try:
            err = (fn().float() - refs[name]).abs().max().item()
            us = timed(fn)
        except Exception as e:  # noqa: BLE001 - out of resources for this config
            err, us = float("nan"), float("inf")
            print(f"  rows {rows} tile {tile_n} warps {warps} stages {stages}: {type(e).__name__}: {str(e)[:80]}")
        res.append((us, err))
    rows_out.append(((rows, tile_n, warps, stages), res))
    print(f"rows {rows:2d} tile_n {tile_n:3d} warps {warps} stages {stages}: " +
          "  ".join(f"{us:7.1f} us (err {err:.1e})" for us, err in res), flush=True)
print("\ncases:", " | ".join(cases))
base = rows_out[0][1]
for key in range(len(cases)):
    best = min(rows_out, key=lambda r: r[1][key][0])
    print(f"{list(cases)[key]:<30} current {base[key][0]:7.1f} us/layer ({base[key][0] * 36 / 1000:.2f} ms/step); best {best[0]} "
          f"{best[1][key][0]:7.1f} us/layer ({best[1][key][0] * 36 / 1000:.2f} ms/step)")
tot = min(rows_out, key=lambda r: sum(x[0] for x in r[1]))
print("best over all cases:", tot[0], " ".join(f"{x[0]:.1f}" for x in tot[1]))
