"""Split-K paged decode attention in Triton (GPU only; imported lazily).

One program per (row, kv head, split); a row is one query token with its own block table and
length (a decode, or one token of a short chunk). It loads the GROUP query heads that share the
kv head (padded to 16 rows for tl.dot), walks its share of the row's context TILE tokens at a
time, reading K/V rows straight from the blocks named by the block table, and keeps an online
softmax. A second kernel merges the splits with their log-sum-exp.

The number of splits is fixed per launch (from the row count alone: a CUDA graph fixes it), but
each row divides its *own* length among them at run time. Splitting the table's full width
instead (32k tokens for every row) launched 128 partitions per row, nearly all past the end of
a ~1k context: at 64 rows x 2 kv heads that was 16k programs and 39 us per layer, ~1.7 ms of a
4.6 ms step on the H200. Shapes are fixed by (rows, max_blocks), lengths come from a device
tensor: safe inside a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = 64  # tokens per inner step
NUM_WARPS = 2
NUM_STAGES = 2
TARGET_PROGRAMS = 512  # rows x kv heads x splits per launch: ~4 per SM of the H200 (tools/gpu_decode_sweep.py)
MAX_SPLITS = 128  # at batch 1, 8k context: 64 tokens per program
TILE_ROWS = 8  # rows of one sequence per program of the tiled kernel (8 x 8 query heads = 64 queries)


def splits_for(rows: int, kv_heads: int) -> int:
    """Splits per row: enough programs to fill the GPU, a power of two, at most MAX_SPLITS."""
    want = max(1, TARGET_PROGRAMS // max(1, rows * kv_heads))
    return min(MAX_SPLITS, triton.next_power_of_2(want))


@triton.jit
def _partial_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, out_ptr, lse_ptr,
    scale, max_blocks, num_parts,
    stride_qb, stride_qh,
    stride_kblk, stride_kpos, stride_kh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
    BLOCK: tl.constexpr, TILE_N: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    ctx = tl.load(lens_ptr + b)
    # this row's context in num_parts shares, whole tiles each
    chunk = tl.cdiv(tl.cdiv(ctx, num_parts), TILE_N) * TILE_N
    start = part * chunk
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D)
    heads = kvh * GROUP + g
    gmask = g < GROUP
    out_off = ((b * num_parts + part) * (GROUP * tl.num_programs(1)) + heads)  # (B, P, H) flat
    if start >= ctx:
        tl.store(lse_ptr + out_off, float("-inf"), mask=gmask)
        return
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=gmask[:, None], other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    end = tl.minimum(start + chunk, ctx)
    for t0 in range(start, end, TILE_N):
        t = t0 + tl.arange(0, TILE_N)
        tmask = t < end
        blk = tl.load(table_ptr + b * max_blocks + t // BLOCK, mask=tmask, other=0)
        row = blk.to(tl.int64) * stride_kblk + (t % BLOCK) * stride_kpos + kvh * stride_kh
        k = tl.load(k_ptr + row[:, None] + d[None, :], mask=tmask[:, None], other=0.0)  # (TILE, D)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale  # (GROUP_PAD, TILE)
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        v = tl.load(v_ptr + row[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + out_off[:, None] * D + d[None, :], out, mask=gmask[:, None])
    tl.store(lse_ptr + out_off, m_i + tl.log(l_i), mask=gmask)


@triton.jit
def _tile_partial_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, first_ptr, count_ptr, out_ptr, lse_ptr,
    scale, max_blocks, num_parts,
    stride_qb, stride_qh,
    stride_kblk, stride_kpos, stride_kh,
    GROUP: tl.constexpr, ROWS: tl.constexpr, M_PAD: tl.constexpr, D: tl.constexpr,
    BLOCK: tl.constexpr, TILE_N: tl.constexpr,
):
    """Like _partial_kernel, for a tile of up to ROWS consecutive rows of one sequence (the
    tokens of a short chunk): they share the block table, so one pass over the context serves
    all their ROWS x GROUP queries (a row-per-program kernel read the context once per row)."""
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    r0 = tl.load(first_ptr + tile)
    nr = tl.load(count_ptr + tile)
    m = tl.arange(0, M_PAD)
    i = m // GROUP
    valid = (i < nr) & (m < ROWS * GROUP)
    row = r0 + i
    heads = kvh * GROUP + m % GROUP
    row_len = tl.load(lens_ptr + row, mask=valid, other=0)
    ctx = tl.max(row_len, 0)
    H = GROUP * tl.num_programs(1)
    out_off = (row * num_parts + part) * H + heads  # (R, P, H) flat
    chunk = tl.cdiv(tl.cdiv(ctx, num_parts), TILE_N) * TILE_N
    start = part * chunk
    if start >= ctx:
        tl.store(lse_ptr + out_off, float("-inf"), mask=valid)
        return
    d = tl.arange(0, D)
    q = tl.load(q_ptr + row[:, None] * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=valid[:, None], other=0.0)
    m_i = tl.full([M_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([M_PAD], tl.float32)
    acc = tl.zeros([M_PAD, D], tl.float32)
    end = tl.minimum(start + chunk, ctx)
    for t0 in range(start, end, TILE_N):
        t = t0 + tl.arange(0, TILE_N)
        tmask = t < end
        blk = tl.load(table_ptr + r0 * max_blocks + t // BLOCK, mask=tmask, other=0)
        kv_row = blk.to(tl.int64) * stride_kblk + (t % BLOCK) * stride_kpos + kvh * stride_kh
        k = tl.load(k_ptr + kv_row[:, None] + d[None, :], mask=tmask[:, None], other=0.0)  # (TILE, D)
        sc = tl.dot(q, tl.trans(k)).to(tl.float32) * scale  # (M_PAD, TILE)
        sc = tl.where(t[None, :] < row_len[:, None], sc, float("-inf"))  # each row's causal end
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing yet: no NaN
        p = tl.exp(sc - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(v_ptr + kv_row[:, None] + d[None, :], mask=tmask[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    has = l_i > 0  # rows whose context ends before this split wrote nothing here
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    tl.store(out_ptr + out_off[:, None] * D + d[None, :], out, mask=(valid & has)[:, None])
    tl.store(lse_ptr + out_off, tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf")), mask=valid)


@triton.jit
def _merge_kernel(part_ptr, lse_ptr, o_ptr, num_parts, H, D: tl.constexpr, P_PAD: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    p = tl.arange(0, P_PAD)
    d = tl.arange(0, D)
    pmask = p < num_parts
    off = (b * num_parts + p) * H + h  # (P,)
    lse = tl.load(lse_ptr + off, mask=pmask, other=float("-inf"))
    # partitions past the context wrote lse = -inf and no output: never read their (garbage) rows
    live = pmask & (lse > float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(live, tl.exp(lse - m), 0.0)
    parts = tl.load(part_ptr + off[:, None] * D + d[None, :], mask=live[:, None], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
    tl.store(o_ptr + (b * H + h) * D + d, out.to(o_ptr.dtype.element_ty))


def triton_paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, scale: float,
                        tiles: torch.Tensor | None = None, *, tile: int = TILE, num_warps: int = NUM_WARPS,
                        num_stages: int = NUM_STAGES, splits: int | None = None) -> torch.Tensor:
    """q: (B, H, D) rows, tables: (B, max_blocks) int32, lens: (B,) int32 -> (B, H, D);
    k/v_cache: (num_blocks, block_size, KVH, D). With tiles (see triton_paged_tiles): one pass
    over the context per run of rows of one sequence."""
    if tiles is not None:
        return triton_paged_tiles(q, k_cache, v_cache, tables, lens, scale, tiles)
    B, H, D = q.shape
    kvh = k_cache.shape[2]
    group = H // kvh
    max_blocks = tables.shape[1]
    num_parts = splits or splits_for(B, kvh)
    partial = torch.empty((B, num_parts, H, D), device=q.device, dtype=torch.float32)
    lse = torch.empty((B, num_parts, H), device=q.device, dtype=torch.float32)
    q = q.contiguous()
    _partial_kernel[(B, kvh, num_parts)](
        q, k_cache, v_cache, tables, lens, partial, lse,
        scale, max_blocks, num_parts,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=D,
        BLOCK=k_cache.shape[1], TILE_N=tile,
        num_warps=num_warps, num_stages=num_stages,
    )
    out = torch.empty_like(q)
    _merge_kernel[(B, H)](partial, lse, out, num_parts, H, D=D, P_PAD=triton.next_power_of_2(num_parts))
    return out


def triton_paged_tiles(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, scale: float,
                       tiles: torch.Tensor, *, num_warps: int = 4, rows: int = TILE_ROWS, tile_n: int = TILE,
                       num_stages: int = NUM_STAGES) -> torch.Tensor:
    """triton_paged_decode for rows grouped in tiles: tiles (2, T) int32 = first row and row
    count (<= TILE_ROWS) of each tile, consecutive rows of one sequence (same table, lengths
    increasing), every row in exactly one tile -> (B, H, D)."""
    B, H, D = q.shape
    kvh = k_cache.shape[2]
    group = H // kvh
    T = tiles.shape[1]
    num_parts = splits_for(T, kvh)
    partial = torch.empty((B, num_parts, H, D), device=q.device, dtype=torch.float32)
    lse = torch.empty((B, num_parts, H), device=q.device, dtype=torch.float32)
    q = q.contiguous()
    _tile_partial_kernel[(T, kvh, num_parts)](
        q, k_cache, v_cache, tables, lens, tiles[0], tiles[1], partial, lse,
        scale, tables.shape[1], num_parts,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=group, ROWS=rows, M_PAD=max(16, triton.next_power_of_2(rows * group)), D=D,
        BLOCK=k_cache.shape[1], TILE_N=tile_n, num_warps=num_warps, num_stages=num_stages,
    )
    out = torch.empty_like(q)
    _merge_kernel[(B, H)](partial, lse, out, num_parts, H, D=D, P_PAD=triton.next_power_of_2(num_parts))
    return out
