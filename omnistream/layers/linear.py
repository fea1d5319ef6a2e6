"""Linear layers that know how to load their checkpoint shards (the nano-vllm pattern).

The checkpoint stores q/k/v and gate/up as separate matrices; we keep each group in one
matrix so a layer does one matmul instead of three (or two). `weight_loader(param, tensor,
shard)` copies a checkpoint tensor into its slice of the packed parameter.
"""

from __future__ import annotations

import torch
from torch import nn

from omnistream.layers.fused import silu_mul


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard: int | None = None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


class MergedLinear(nn.Linear):
    """One Linear whose output rows are the concatenation of several checkpoint matrices."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool, padded_sizes: list[int] | None = None) -> None:
        padded_sizes = padded_sizes or out_sizes
        super().__init__(in_features, sum(padded_sizes), bias=bias)
        self.out_sizes, self.padded_sizes = out_sizes, padded_sizes
        self.weight.weight_loader = self._load_shard
        if bias:
            self.bias.weight_loader = self._load_shard

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard: int | None = None) -> None:
        assert shard is not None, "packed parameter needs a shard index"
        start = sum(self.padded_sizes[:shard])
        slot = param.data.narrow(0, start, self.padded_sizes[shard])
        target = slot.narrow(0, 0, self.out_sizes[shard])
        if target.shape != loaded.shape:
            raise ValueError(f"shard {shard}: expected {tuple(target.shape)}, got {tuple(loaded.shape)}")
        slot.zero_()  # padding rows stay zero: they add exact zeros downstream
        target.copy_(loaded)


def _load_padded_columns(param: nn.Parameter, loaded: torch.Tensor, shard: int | None = None) -> None:
    """(out, in) checkpoint matrix into the first `in` columns of a wider parameter."""
    if param.dim() == 1 or param.shape[1] == loaded.shape[1]:
        default_weight_loader(param, loaded)
        return
    param.data.zero_()
    target = param.data[:, : loaded.shape[1]]
    if target.shape != loaded.shape:
        raise ValueError(f"expected {tuple(target.shape)}, got {tuple(loaded.shape)}")
    target.copy_(loaded)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up packed in one matmul."""

    def __init__(self, hidden: int, intermediate: int, bias: bool) -> None:
        super().__init__()
        # pad an odd intermediate size (the vision tower's 3420) to a multiple of 128 with zero
        # weights: same result, but the GEMMs get tensor-core friendly shapes (2x faster on H100)
        padded = intermediate if intermediate % 64 == 0 else -(-intermediate // 128) * 128
        self.gate_up_proj = MergedLinear(hidden, [intermediate, intermediate], bias=bias, padded_sizes=[padded, padded])
        self.down_proj = nn.Linear(padded, hidden, bias=bias)
        self.down_proj.weight.weight_loader = _load_padded_columns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up_proj(x)))
