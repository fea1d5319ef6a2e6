"""GPU kernels against their torch references (random inputs, 3B and 7B head shapes):
layers/triton_decode (split paged attention) vs layers/paged_decode.torch_paged_decode, and
layers/triton_rope_kv (rotary + KV write) vs layers/fused._rope_qk + attention.write_kv.
Prints the max abs error of each; exits 1 if one is over its bf16 tolerance."""

import sys

import torch

from omnistream.layers.attention import row_layout, row_tiles, write_kv
from omnistream.layers.fused import _rope_qk
from omnistream.layers.paged_decode import torch_paged_decode
from omnistream.layers.rotary import MRotaryEmbedding
from omnistream.layers.triton_decode import TILE_ROWS, triton_paged_decode
from omnistream.layers.triton_rope_kv import rope_write_kv

torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
bad = 0
for heads, kvh in ((16, 2), (28, 4)):
    D, bs, blocks = 128, 16, 4096
    kc = torch.randn(blocks, bs, kvh, D, device=dev, dtype=dt)
    vc = torch.randn(blocks, bs, kvh, D, device=dev, dtype=dt)
    for rows, max_blocks in ((1, 2048), (7, 600), (32, 2048), (64, 2048), (200, 128)):
        lens = torch.randint(1, max_blocks * bs, (rows,), device=dev, dtype=torch.int32)
        lens[0] = 1
        tables = torch.randint(0, blocks, (rows, max_blocks), device=dev, dtype=torch.int32)
        q = torch.randn(rows, heads, D, device=dev, dtype=dt)
        ref = torch_paged_decode(q.float(), kc.float(), vc.float(), tables, lens, D**-0.5)
        out = triton_paged_decode(q, kc, vc, tables, lens, D**-0.5).float()
        err = (out - ref).abs().max().item()
        bad += err > 2e-2
        print(f"decode H={heads} KVH={kvh} rows={rows:3d} max_blocks={max_blocks}: max abs err {err:.2e}")
    # short chunks as tiles: rows of one sequence share a pass over the context
    for qlens in ([40, 1, 17, 128, 3], [1] * 9 + [64], [100] * 6):
        starts = torch.randint(0, 3000, (len(qlens),)).tolist()
        seq_tables = torch.randint(0, blocks, (len(qlens), 400), dtype=torch.int32)
        tables, lens = row_layout(seq_tables, starts, qlens)
        tables, lens = tables.to(dev), lens.to(dev)
        q = torch.randn(len(lens), heads, D, device=dev, dtype=dt)
        ref = torch_paged_decode(q.float(), kc.float(), vc.float(), tables, lens, D**-0.5)
        out = triton_paged_decode(q, kc, vc, tables, lens, D**-0.5, row_tiles(qlens, TILE_ROWS).to(dev)).float()
        err = (out - ref).abs().max().item()
        bad += err > 2e-2
        print(f"tiles  H={heads} KVH={kvh} chunks={qlens[:6]}{'...' if len(qlens) > 6 else ''}: max abs err {err:.2e}")
    rot = MRotaryEmbedding(D, 1e6, (16, 24, 24)).to(dev)
    for n in (1, 64, 3000):
        qkv = torch.randn(n, (heads + 2 * kvh) * D, device=dev, dtype=dt)
        pos = torch.randint(0, 30000, (3, n), device=dev)
        cos, sin = rot(pos, dt)
        slots = torch.randperm(blocks * bs, device=dev)[:n]
        k1, v1, k2, v2 = (torch.zeros(blocks, bs, kvh, D, device=dev, dtype=dt) for _ in range(4))
        qr, kr, vr = qkv.split([heads * D, kvh * D, kvh * D], dim=-1)
        qr, kr = _rope_qk(qr.reshape(n, heads, D).float(), kr.reshape(n, kvh, D).float(), cos.float(), sin.float(), False)
        write_kv(k1, v1, kr.to(dt), vr.reshape(n, kvh, D), slots)
        q, k, v = rope_write_kv(qkv, cos, sin, k2, v2, slots, heads, kvh, D)
        errs = [(q.float() - qr).abs().max().item(), (k.float() - kr).abs().max().item(),
                (k2.float() - k1.float()).abs().max().item(), (v2.float() - v1.float()).abs().max().item(),
                (v.float() - vr.reshape(n, kvh, D).float()).abs().max().item()]
        bad += max(errs) > 3e-2 or errs[3] > 0 or errs[4] > 0
        print(f"rope+kv H={heads} KVH={kvh} n={n:5d}: max abs err q {errs[0]:.2e} k {errs[1]:.2e} k-cache {errs[2]:.2e} v-cache {errs[3]:.1e} v {errs[4]:.1e}")
print("kernel check:", "FAILED" if bad else "ok")
sys.exit(1 if bad else 0)
