"""Row attention over the paged KV cache: R independent rows, each one query token with its own
block table and context length (a decode is one row; a short chunk is one row per token, row i
seeing the context up to itself). CUDA-graph safe: every shape is fixed by (R, max_blocks); the
true lengths come in as a device tensor.

- `torch_paged_decode`: gathers each row's blocks into a padded batch and calls SDPA with a
  length mask. Runs anywhere; the CPU tests check it against the reference path.
- `triton_paged_decode` (GPU): split-K flash decoding that reads K/V straight from the blocks;
  see layers/triton_decode.py.
Both follow attention.RowBackend: (q, k_cache, v_cache, tables, lens, scale, tiles).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def torch_paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor, scale: float,
                       tiles: torch.Tensor | None = None) -> torch.Tensor:
    """q: (R, H, D), tables: (R, max_blocks) int32, lens: (R,) int32 -> (R, H, D). Every row on
    its own (tiles, a grouping that changes nothing in the result, are not used)."""
    h = q.shape[1]
    bs = k_cache.shape[1]
    k = k_cache[tables].flatten(1, 2)  # (R, M*bs, KVH, D)
    v = v_cache[tables].flatten(1, 2)
    rep = h // k.shape[2]
    k = k.transpose(1, 2).repeat_interleave(rep, 1)  # (R, H, M*bs, D)
    v = v.transpose(1, 2).repeat_interleave(rep, 1)
    mask = torch.arange(tables.shape[1] * bs, device=q.device)[None, :] < lens[:, None]  # (R, M*bs)
    out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask[:, None, None, :], scale=scale)
    return out[:, :, 0, :]
