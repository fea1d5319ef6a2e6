"""Causal attention over a paged KV cache.

The cache of one layer is two tensors (num_blocks, block_size, kv_heads, head_dim). A sequence
owns a list of blocks (its block table); token i of a sequence lives in slot
block_table[i // block_size] * block_size + i % block_size. Every forward first writes the new
tokens' K/V into their slots, then attends each query to its sequence's whole context.

Two paths compute the same function (`paged_attention` picks):
- `reference`: per sequence, gather the context from the blocks and call SDPA (CPU default;
  on the GPU the path of long chunks, whose flash-attention time hides the Python loop);
- rows: every token of the short sequences (decodes, follow-up questions, live patches) is one
  independent row (one query, its own block table and context length up to itself), all rows
  in one launch of a paged row kernel (layers/paged_decode.py, layers/triton_decode.py). The
  step's K/V is written before attention reads, so a row sees exactly its causal context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

# No cuDNN attention: it builds an execution plan for every new (query, key) length pair, which
# cost 0.1-1.7 s on the first follow-up question of each new length (measured on an H100).
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# (q (R, H, D), k_cache, v_cache, tables (R, max_blocks) int32, lens (R,) int32, scale,
#  tiles (2, T) int32 or None) -> (R, H, D). tiles: runs of consecutive rows of one sequence
# (first row, count) that a backend may serve with one pass over their shared context
RowBackend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, torch.Tensor | None], torch.Tensor]


@dataclass
class AttentionMetadata:
    """How the flat token batch of one forward maps onto sequences and cache slots.

    Sequences are in batch order. When the row fields are set, the first `num_row_seqs`
    sequences (the runner puts the short ones first) are served by the row kernel: their tokens
    are the first R rows of the batch; the other sequences go through the reference path."""

    slot_mapping: torch.Tensor  # (N,) long: cache slot written by each token of the batch
    query_lens: list[int]  # new tokens of each sequence in this forward (sum = N)
    context_lens: list[int]  # cached + new tokens of each sequence after this forward
    block_tables: list[torch.Tensor]  # per sequence (>= ceil(ctx / block_size),) long, on the cache's device
    # row path: row r = token r of the batch, one query over its own blocks; tables are padded
    # with a block no sequence owns (the kernels read only the first lens[r] tokens)
    row_block_tables: torch.Tensor | None = None  # (R, max_blocks) int32
    row_context_lens: torch.Tensor | None = None  # (R,) int32: tokens row r sees (its position + 1)
    num_row_seqs: int = 0  # leading sequences whose tokens are the R rows (sum of their query_lens = R)
    row_tiles: torch.Tensor | None = None  # (2, T) int32: first row, row count of runs of one sequence (see RowBackend)
    query_starts: list[int] = field(init=False)

    def __post_init__(self) -> None:
        starts, s = [], 0
        for n in self.query_lens:
            starts.append(s)
            s += n
        self.query_starts = starts

    @property
    def num_rows(self) -> int:
        return 0 if self.row_block_tables is None else self.row_block_tables.shape[0]


def row_layout(tables: torch.Tensor, starts: list[int], query_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the row kernel for sequences of padded block tables (B, W) whose new tokens start
    at `starts` (that many tokens cached before them) -> tables (R, W) int32 and context lengths
    (R,) int32, R = sum(query_lens): token i of sequence b sees starts[b] + i + 1 tokens."""
    counts = torch.tensor(query_lens)
    first_row = counts.cumsum(0) - counts  # (B,) row of each sequence's first new token
    shift = (torch.tensor(starts) - first_row).repeat_interleave(counts)  # (R,)
    lens = torch.arange(int(counts.sum())) + shift + 1
    return tables.to(torch.int32).repeat_interleave(counts, dim=0), lens.to(torch.int32)


def row_tiles(query_lens: list[int], rows_per_tile: int) -> torch.Tensor:
    """(2, T) int32: each sequence's rows (query_lens[i] consecutive rows, in order) cut into
    runs of at most rows_per_tile: (first row, count)."""
    first, count, row = [], [], 0
    for n in query_lens:
        for a in range(0, n, rows_per_tile):
            first.append(row + a)
            count.append(min(rows_per_tile, n - a))
        row += n
    return torch.tensor([first, count], dtype=torch.int32)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """k, v: (N, KVH, D) into caches (num_blocks, block_size, KVH, D) at flat `slots` (N,)."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """-> (length, KVH, D): the first `length` tokens of a sequence, in order."""
    bs = cache.shape[1]
    nblocks = (length + bs - 1) // bs
    return cache[block_table[:nblocks]].flatten(0, 1)[:length]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, row_backend: RowBackend | None = None) -> torch.Tensor:
    """q: (N, H, D), the batch's new k, v: (N, KVH, D), already written to the caches -> (N, H, D).

    With a row backend and row metadata: the first R tokens in one kernel launch, the remaining
    (long) sequences one SDPA call each. Otherwise the reference path for every sequence."""
    if row_backend is None or meta.row_block_tables is None:
        return reference_attention(q, k, v, k_cache, v_cache, meta, scale)
    r = meta.num_rows
    rows = row_backend(q[:r], k_cache, v_cache, meta.row_block_tables, meta.row_context_lens, scale, meta.row_tiles)
    if r == q.shape[0]:  # decodes and short chunks only: no copy
        return rows
    out = torch.empty_like(q)
    out[:r] = rows
    for i in range(meta.num_row_seqs, len(meta.query_lens)):
        _sequence_attention(out, q, k, v, k_cache, v_cache, meta, i, scale)
    return out


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: (N, H, D), the batch's new k, v: (N, KVH, D) -> (N, H, D).

    Loops over sequences (not over windows or tokens). A sequence with no cached prefix
    attends to its own new k, v directly; otherwise its context is gathered from the blocks."""
    out = torch.empty_like(q)
    for i in range(len(meta.query_lens)):
        _sequence_attention(out, q, k, v, k_cache, v_cache, meta, i, scale)
    return out


def _sequence_attention(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, meta: AttentionMetadata, i: int, scale: float) -> None:
    """Sequence i of the batch: its rows of out (N, H, D) from SDPA over its whole context."""
    start, qlen, ctx = meta.query_starts[i], meta.query_lens[i], meta.context_lens[i]
    qs = q[start : start + qlen].transpose(0, 1)  # (H, q, D)
    if qlen == ctx:
        ks, vs = k[start : start + qlen], v[start : start + qlen]
    else:
        table = meta.block_tables[i]
        ks, vs = gather_context(k_cache, table, ctx), gather_context(v_cache, table, ctx)
    ks, vs = ks.transpose(0, 1), vs.transpose(0, 1)  # (KVH, ctx, D)
    out[start : start + qlen] = _causal_sdpa(qs, ks, vs, scale).transpose(0, 1)


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q: (H, q, D) queries at the last q positions of a context k, v: (KVH, ctx, D)."""
    qlen, ctx = q.shape[1], k.shape[1]
    if k.shape[0] != q.shape[0]:  # GQA: repeat kv heads (enable_gqa is not on every backend)
        rep = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    # a batch dim of 1: the fused (flash / memory-efficient) kernels need 4-D inputs
    q, k, v = q[None], k[None], v[None]
    with sdpa_kernel(_BACKENDS):
        if qlen == 1:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)[0]
        if qlen == ctx:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)[0]
        # query i sits at absolute position ctx - qlen + i and sees keys 0..that position: the
        # bottom-right aligned causal mask, which the flash kernel applies without a mask tensor
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(qlen, ctx), scale=scale)[0]
