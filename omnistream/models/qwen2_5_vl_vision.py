"""Qwen2.5-VL vision tower on our own runtime.

Data flow for a batch of media items (pixel rows already in the checkpoint's patch layout):

  pixel_values (P, 3*2*14*14)
    -> patch embed: one matmul (the Conv3d's kernel equals its stride)       (P, C)
    -> reorder tokens into 8x8-patch windows (in units of 2x2 merge groups)   (P, C)
    -> blocks: window attention, or full attention within one temporal slice
    -> patch merger (RMSNorm, 2x2 concat, MLP)                                (P/4, out)
    -> undo the window order                                                  (P/4, out)

Attention never crosses a temporal slice (2 frames), so encoding a video slice by slice equals
encoding it whole; the encoder cache relies on this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generator

import torch
import torch.nn.functional as F
from torch import nn

from omnistream.layers.fused import rope_qk
from omnistream.layers.norm import RMSNorm
from omnistream.layers.rotary import VisionRotaryEmbedding
from omnistream.layers.segment_attention import SegmentLayout, segment_attention
from omnistream.layers.linear import SwiGLU
from omnistream.stepwise import drain
from omnistream.models.hf_config import VisionConfig


@dataclass
class VisionLayout:
    """Index tensors for one vision forward (computed on the CPU from the grids, then moved)."""

    window_index: torch.Tensor  # (P/4,) merge-group order used inside the blocks
    reverse_index: torch.Tensor  # (P/4,) undoes window_index on the merger output
    hw_positions: torch.Tensor  # (P, 2) (row, col) of every patch, in window order
    window_segments: SegmentLayout
    full_segments: SegmentLayout


def _item_layout(t: int, h: int, w: int, merge: int, win: int, offset: int):
    """Window order, window lengths (in patches) and (row, col) positions for one grid.

    win: window side in merge groups (window_size // merge // patch = 4 for 112 px)."""
    lh, lw = h // merge, w // merge
    index = torch.arange(t * lh * lw).reshape(t, lh, lw)
    pad_h, pad_w = (-lh) % win, (-lw) % win
    padded = F.pad(index, (0, pad_w, 0, pad_h), value=-1)
    nh, nw = (lh + pad_h) // win, (lw + pad_w) // win
    windows = padded.reshape(t, nh, win, nw, win).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, win * win)
    valid = windows >= 0
    lengths = (valid.sum(1) * merge * merge).tolist()
    order = windows[valid] + offset  # merge groups in window order

    # (row, col) of each patch in the checkpoint's row order: block-major 2x2 groups
    rows = torch.arange(h).view(lh, merge, 1, 1).expand(lh, merge, lw, merge)
    cols = torch.arange(w).view(1, 1, lw, merge).expand(lh, merge, lw, merge)
    rows = rows.permute(0, 2, 1, 3).reshape(-1)
    cols = cols.permute(0, 2, 1, 3).reshape(-1)
    hw = torch.stack([rows, cols], dim=-1).repeat(t, 1)  # (t*h*w, 2)
    return order, [l for l in lengths if l > 0], hw


def build_layout(grids: list[tuple[int, int, int]], cfg: VisionConfig, device: torch.device) -> VisionLayout:
    merge = cfg.spatial_merge_size
    win = cfg.window_size // merge // cfg.patch_size
    orders, win_lens, hws, full_lens = [], [], [], []
    offset = 0
    for t, h, w in grids:
        order, lens, hw = _item_layout(t, h, w, merge, win, offset)
        orders.append(order)
        win_lens += lens
        hws.append(hw)
        full_lens += [h * w] * t
        offset += t * (h // merge) * (w // merge)
    window_index = torch.cat(orders)
    hw_all = torch.cat(hws).view(-1, merge * merge, 2)[window_index].view(-1, 2)
    return VisionLayout(
        window_index=window_index.to(device),
        reverse_index=torch.argsort(window_index).to(device),
        hw_positions=hw_all.to(device),
        window_segments=SegmentLayout.from_lengths(win_lens, device),
        full_segments=SegmentLayout.from_lengths(full_lens, device),
    )


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: SegmentLayout) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # (N, H, D) each
        # rotary in float32, as the reference does, then back to the compute dtype
        q, k = rope_qk(q, k, cos, sin, upcast=True)
        out = segment_attention(q, k, v, layout, scale=self.head_dim**-0.5)
        return self.proj(out.reshape(n, -1))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, bias=True)

    def forward(self, x, cos, sin, layout: SegmentLayout) -> torch.Tensor:
        h = self.attn(self.norm1(x), cos, sin, layout)
        x, h = self.norm2.add_forward(h, x)
        return x + self.mlp(h)


class PatchMerger(nn.Module):
    def __init__(self, out_dim: int, dim: int, merge: int) -> None:
        super().__init__()
        self.hidden = dim * merge * merge
        self.ln_q = RMSNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.hidden, self.hidden), nn.GELU(), nn.Linear(self.hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.hidden))  # (P/4, out)


class PatchEmbed(nn.Module):
    """The Conv3d (kernel = stride = 2x14x14) as one matmul over flattened patches."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        p, tp = cfg.patch_size, cfg.temporal_patch_size
        self.proj = nn.Module()
        self.proj.weight = nn.Parameter(torch.empty(cfg.hidden_size, cfg.in_channels, tp, p, p))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return pixels.to(w.dtype) @ w.view(w.shape[0], -1).T  # (P, 1176) @ (1176, C) -> (P, C)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.rotary = VisionRotaryEmbedding(cfg.hidden_size // cfg.num_heads)
        self.blocks = nn.ModuleList([VisionBlock(cfg) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg.out_hidden_size, cfg.hidden_size, cfg.spatial_merge_size)
        self.full_blocks = set(cfg.fullatt_block_indexes)

    def layout(self, grids: list[tuple[int, int, int]], device: torch.device) -> VisionLayout:
        """The index tables of a forward over these grids, made before a CUDA-graph capture
        (which cannot copy them to the GPU)."""
        return build_layout(grids, self.cfg, device)

    def forward(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]], layout: VisionLayout | None = None) -> torch.Tensor:
        """pixel_values: (P, 1176) for all items concatenated -> (P/4, out_hidden) embeddings.
        layout: self.layout(grids) made beforehand (CUDA-graph capture cannot copy to the GPU)."""
        return drain(self.forward_steps(pixel_values, grids, layout))

    def forward_steps(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]],
                      layout: VisionLayout | None = None) -> Generator[None, None, torch.Tensor]:
        """forward() one block at a time: the generator yields after the patch embedding and
        after each block (the engine spreads a long clip's encode over its decode steps:
        engine/encode_ahead.py) and returns the (P/4, out_hidden) embeddings. The same
        operations in the same order as forward()."""
        layout = layout or build_layout(grids, self.cfg, pixel_values.device)
        unit = self.cfg.spatial_merge_size**2
        x = self.patch_embed(pixel_values)
        del pixel_values  # (P, 1176) prepared pixels: not kept while the blocks run over steps
        x = x.view(-1, unit, x.shape[-1])[layout.window_index].flatten(0, 1)
        cos, sin = self.rotary(layout.hw_positions)
        yield  # the layout's tables (host work, small copies) and the patch embedding
        for i, blk in enumerate(self.blocks):
            seg = layout.full_segments if i in self.full_blocks else layout.window_segments
            x = blk(x, cos, sin, seg)
            yield
        return self.merger(x)[layout.reverse_index]

    @property
    def num_steps(self) -> int:
        """How many times forward_steps yields: after the embedding, then after each block."""
        return len(self.blocks) + 1
