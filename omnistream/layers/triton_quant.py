"""Weight-only 8-bit linear for few rows in Triton (GPU only; imported lazily by layers/quant.py).

out (M, N) = x (M, K) @ (q (N, K) * scale (N,)).T + bias, for M <= MAX_ROWS (decode batches: the
CUDA-graph buckets that compute logits in the graph, cuda_graphs.LOGITS_ROWS). At batch 1 a linear layer is a pass over its weight: reading the
int8 (or fp8) weight directly halves the bytes of a bf16 one, where dequantizing first would
read 1 byte, write 2 and read 2 again per weight.

One program per (BLOCK_N output rows, share of K). It walks its K share BLOCK_K at a time,
widening the 8-bit tile to the activations' dtype in registers and accumulating x @ w.T in
float32 (tl.dot; M is padded to a power of two of at least 16 rows, the smallest MMA tile: at
M = 1 the unused rows cost compute the GPU has to spare). Split-K keeps the GPU full when N is small (o_proj,
down_proj: N = 2048 on the 3B gives 32 row blocks for 132 SMs): the shares' float32 partials
(splits, M, N) are summed by a second kernel, which applies the per-row scale and the bias. With
one share the first kernel does that itself. Every shape is fixed by (M, N, K): safe inside a
CUDA graph (the partials buffer comes from the graph's pool).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MAX_ROWS = 64  # rows of x one launch takes, all in every program (layers/quant.GEMV_MAX_ROWS)
MIN_BLOCK_M = 16  # tl.dot's smallest tile
BLOCK_N = 64  # output rows (weight rows) per program
BLOCK_K = 128  # reduction step: a (64, 128) 8-bit tile is 8 KB
PROGRAMS_PER_SM = 4  # split K until the launch has about this many programs per SM
NUM_WARPS = 4
NUM_STAGES = 3
REDUCE_BLOCK = 1024


@triton.jit
def _w8_kernel(
    x_ptr, q_ptr, scale_ptr, bias_ptr, out_ptr, part_ptr,
    M, N, K, k_per_split, stride_xm, stride_qn,
    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mmask = rm < M
    nmask = rn < N
    k0 = pid_k * k_per_split
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for kk in range(0, k_per_split, BK):
        rk = k0 + kk + tl.arange(0, BK)
        kmask = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(q_ptr + rn[:, None] * stride_qn + rk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    omask = mmask[:, None] & nmask[None, :]
    if SPLIT:
        tl.store(part_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :], acc, mask=omask)
    else:
        acc = acc * tl.load(scale_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _reduce_kernel(part_ptr, scale_ptr, bias_ptr, out_ptr, M, N, splits, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat over (M, N)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0)
    n = offs % N
    acc = acc * tl.load(scale_ptr + n, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _has_fp8(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 9)  # Ada / Hopper: fp8 loads and converts


def supports(qdtype: torch.dtype, x: torch.Tensor) -> bool:
    """Whether w8_linear can run this: half-precision activations (float32 ones would make tl.dot
    round them to tf32), at most MAX_ROWS rows, an fp8 weight only where the card has fp8."""
    if x.dtype not in (torch.bfloat16, torch.float16) or x.numel() // x.shape[-1] > MAX_ROWS:
        return False
    return qdtype == torch.int8 or (qdtype == torch.float8_e4m3fn and _has_fp8(_index(x.device)))


def split_plan(n: int, k: int, sms: int) -> tuple[int, int]:
    """-> (splits, K per split, a multiple of BLOCK_K): split K until the launch has about
    PROGRAMS_PER_SM programs per SM."""
    n_blocks, k_blocks = triton.cdiv(n, BLOCK_N), triton.cdiv(k, BLOCK_K)
    splits = max(1, min(k_blocks, PROGRAMS_PER_SM * sms // n_blocks))
    per = triton.cdiv(k_blocks, splits) * BLOCK_K
    return triton.cdiv(k, per), per


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def w8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, sms: int | None = None) -> torch.Tensor:
    """x (..., K) half precision, q (N, K) int8 / float8_e4m3fn, scale (N,), bias (N,) or None
    -> (..., N) in x's dtype. sms: the SM count the split plan fills (default: the device's;
    given by the CPU test that runs this under TRITON_INTERPRET=1)."""
    n, k = q.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    splits, per = split_plan(n, k, sms or _sm_count(_index(x.device)))
    part = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if splits > 1 else out
    b = bias if bias is not None else scale  # any pointer; HAS_BIAS=False never reads it
    _w8_kernel[(triton.cdiv(n, BLOCK_N), splits)](
        x2, q, scale, b, out, part, m, n, k, per, x2.stride(0), q.stride(0),
        SPLIT=splits > 1, HAS_BIAS=bias is not None, BM=max(MIN_BLOCK_M, triton.next_power_of_2(m)), BN=BLOCK_N, BK=BLOCK_K,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    if splits > 1:
        _reduce_kernel[(triton.cdiv(m * n, REDUCE_BLOCK),)](part, scale, b, out, m, n, splits,
                                                            HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK)
    return out.view(*x.shape[:-1], n)
