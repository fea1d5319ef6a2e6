"""Rotary + KV write in one Triton kernel (GPU only; imported lazily).

Per token, the attention block rotated q and k (two compiled kernels) and then wrote k and v
into the paged cache (two index_copy kernels): four launches per layer, ~1 ms of a 64-row
decode step across 36 layers on the H200, for a few KB of data each. This kernel does all of it
from the packed qkv projection in one launch: q rotated into its own tensor, k rotated into its
tensor and into its cache slot, v copied into its cache slot. The math is the rotate-half rule
of layers/fused._rope_qk, computed in float32 and rounded once (as the compiled kernel does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kv_kernel(
    qkv_ptr, cos_ptr, sin_ptr, slots_ptr, q_ptr, k_ptr, k_cache_ptr, v_cache_ptr,
    stride_qkv, stride_cs,
    H: tl.constexpr, KVH: tl.constexpr, H_PAD: tl.constexpr, KVH_PAD: tl.constexpr, HALF: tl.constexpr,
):
    n = tl.program_id(0)
    D: tl.constexpr = 2 * HALF
    j = tl.arange(0, HALF)
    c1 = tl.load(cos_ptr + n * stride_cs + j).to(tl.float32)
    c2 = tl.load(cos_ptr + n * stride_cs + HALF + j).to(tl.float32)
    s1 = tl.load(sin_ptr + n * stride_cs + j).to(tl.float32)
    s2 = tl.load(sin_ptr + n * stride_cs + HALF + j).to(tl.float32)
    row = qkv_ptr + n.to(tl.int64) * stride_qkv
    # q: (H, D) -> rotated into q_ptr (N, H, D)
    h = tl.arange(0, H_PAD)
    hm = (h < H)[:, None]
    x1 = tl.load(row + h[:, None] * D + j[None, :], mask=hm, other=0.0).to(tl.float32)
    x2 = tl.load(row + h[:, None] * D + HALF + j[None, :], mask=hm, other=0.0).to(tl.float32)
    qo = q_ptr + n.to(tl.int64) * (H * D) + h[:, None] * D + j[None, :]
    tl.store(qo, (x1 * c1[None, :] - x2 * s1[None, :]).to(q_ptr.dtype.element_ty), mask=hm)
    tl.store(qo + HALF, (x2 * c2[None, :] + x1 * s2[None, :]).to(q_ptr.dtype.element_ty), mask=hm)
    # k: (KVH, D) -> rotated into k_ptr (N, KVH, D) and the cache slot; v: copied to its slot
    g = tl.arange(0, KVH_PAD)
    gm = (g < KVH)[:, None]
    kbase = row + H * D + g[:, None] * D + j[None, :]
    y1 = tl.load(kbase, mask=gm, other=0.0).to(tl.float32)
    y2 = tl.load(kbase + HALF, mask=gm, other=0.0).to(tl.float32)
    k1 = (y1 * c1[None, :] - y2 * s1[None, :]).to(k_ptr.dtype.element_ty)
    k2 = (y2 * c2[None, :] + y1 * s2[None, :]).to(k_ptr.dtype.element_ty)
    ko = k_ptr + n.to(tl.int64) * (KVH * D) + g[:, None] * D + j[None, :]
    tl.store(ko, k1, mask=gm)
    tl.store(ko + HALF, k2, mask=gm)
    slot = tl.load(slots_ptr + n).to(tl.int64)
    co = slot * (KVH * D) + g[:, None] * D + j[None, :]
    tl.store(k_cache_ptr + co, k1, mask=gm)
    tl.store(k_cache_ptr + co + HALF, k2, mask=gm)
    vbase = row + (H + KVH) * D + g[:, None] * D + j[None, :]
    tl.store(v_cache_ptr + co, tl.load(vbase, mask=gm, other=0.0), mask=gm)
    tl.store(v_cache_ptr + co + HALF, tl.load(vbase + HALF, mask=gm, other=0.0), mask=gm)


def rope_write_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slots: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int):
    """qkv: (N, (H + 2 KVH) * D) packed projection, cos/sin: (N, D), caches (blocks, block_size,
    KVH, D) contiguous, slots: (N,) -> q (N, H, D) and k (N, KVH, D) rotated, v (N, KVH, D) a
    view of qkv; k and v are written to the caches at `slots`."""
    n = qkv.shape[0]
    assert qkv.stride(1) == 1 and cos.stride(1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    q = torch.empty((n, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((n, num_kv_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if n:
        _rope_kv_kernel[(n,)](
            qkv, cos, sin, slots, q, k, k_cache, v_cache, qkv.stride(0), cos.stride(0),
            H=num_heads, KVH=num_kv_heads, H_PAD=triton.next_power_of_2(num_heads),
            KVH_PAD=triton.next_power_of_2(num_kv_heads), HALF=head_dim // 2, num_warps=4,
        )
    v = qkv[:, (num_heads + num_kv_heads) * head_dim :].view(n, num_kv_heads, head_dim)
    return q, k, v
