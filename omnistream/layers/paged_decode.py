"""Decode attention (one query per sequence) over the paged KV cache, CUDA-graph safe: every
shape is fixed by (batch, max_blocks); the true lengths come in as a device tensor.

- `torch_paged_decode`: gathers each sequence's blocks into a padded batch and calls SDPA with
  a length mask. Runs anywhere; the CPU tests check it against the reference path.
- `triton_paged_decode` (GPU): split-K flash decoding that reads K/V straight from the blocks;
  see layers/triton_decode.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnistream.layers.attention import AttentionMetadata


def torch_paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: (B, H, D) -> (B, H, D)."""
    tables, lens = meta.decode_block_tables, meta.decode_context_lens
    b, h, d = q.shape
    bs = k_cache.shape[1]
    k = k_cache[tables].flatten(1, 2)  # (B, M*bs, KVH, D)
    v = v_cache[tables].flatten(1, 2)
    rep = h // k.shape[2]
    k = k.transpose(1, 2).repeat_interleave(rep, 1)  # (B, H, M*bs, D)
    v = v.transpose(1, 2).repeat_interleave(rep, 1)
    mask = torch.arange(tables.shape[1] * bs, device=q.device)[None, :] < lens[:, None]  # (B, M*bs)
    out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask[:, None, None, :], scale=scale)
    return out[:, :, 0, :]
