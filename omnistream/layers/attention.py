"""Causal attention over a paged KV cache.

The cache of one layer is two tensors (num_blocks, block_size, kv_heads, head_dim). A sequence
owns a list of blocks (its block table); token i of a sequence lives in slot
block_table[i // block_size] * block_size + i % block_size. Every forward first writes the new
tokens' K/V into their slots, then attends each query to its sequence's whole context.

Two paths compute the same function:
- `reference`: per sequence, gather the context from the blocks and call SDPA (CPU, prefill);
- `decode` kernel (GPU, one query per sequence, CUDA-graph safe): see layers/paged_decode.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

# No cuDNN attention: it builds an execution plan for every new (query, key) length pair, which
# cost 0.1-1.7 s on the first follow-up question of each new length (measured on an H100).
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class AttentionMetadata:
    """How the flat token batch of one forward maps onto sequences and cache slots."""

    slot_mapping: torch.Tensor  # (N,) long: cache slot written by each token of the batch
    query_lens: list[int]  # new tokens of each sequence in this forward (sum = N)
    context_lens: list[int]  # cached + new tokens of each sequence after this forward
    block_tables: list[torch.Tensor]  # per sequence (num_blocks,) long, on the cache's device
    # decode fast path (all query_lens == 1): padded tables + lengths as device tensors
    decode_block_tables: torch.Tensor | None = None  # (B, max_blocks) int32
    decode_context_lens: torch.Tensor | None = None  # (B,) int32
    query_starts: list[int] = field(init=False)

    def __post_init__(self) -> None:
        starts, s = [], 0
        for n in self.query_lens:
            starts.append(s)
            s += n
        self.query_starts = starts

    @property
    def is_decode(self) -> bool:
        return self.decode_block_tables is not None


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """k, v: (N, KVH, D) into caches (num_blocks, block_size, KVH, D) at flat `slots` (N,)."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """-> (length, KVH, D): the first `length` tokens of a sequence, in order."""
    bs = cache.shape[1]
    nblocks = (length + bs - 1) // bs
    return cache[block_table[:nblocks]].flatten(0, 1)[:length]


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: (N, H, D), the batch's new k, v: (N, KVH, D) -> (N, H, D).

    Loops over sequences (not over windows or tokens). A sequence with no cached prefix
    attends to its own new k, v directly; otherwise its context is gathered from the blocks."""
    out = torch.empty_like(q)
    for start, qlen, ctx, table in zip(meta.query_starts, meta.query_lens, meta.context_lens, meta.block_tables):
        qs = q[start : start + qlen].transpose(0, 1)  # (H, q, D)
        if qlen == ctx:
            ks, vs = k[start : start + qlen], v[start : start + qlen]
        else:
            ks, vs = gather_context(k_cache, table, ctx), gather_context(v_cache, table, ctx)
        ks, vs = ks.transpose(0, 1), vs.transpose(0, 1)  # (KVH, ctx, D)
        out[start : start + qlen] = _causal_sdpa(qs, ks, vs, scale).transpose(0, 1)
    return out


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
