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

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool) -> None:
        super().__init__(in_features, sum(out_sizes), bias=bias)
        self.out_sizes = out_sizes
        self.weight.weight_loader = self._load_shard
        if bias:
            self.bias.weight_loader = self._load_shard

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard: int | None = None) -> None:
        assert shard is not None, "packed parameter needs a shard index"
        start = sum(self.out_sizes[:shard])
        target = param.data.narrow(0, start, self.out_sizes[shard])
        if target.shape != loaded.shape:
            raise ValueError(f"shard {shard}: expected {tuple(target.shape)}, got {tuple(loaded.shape)}")
        target.copy_(loaded)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up packed in one matmul."""

    def __init__(self, hidden: int, intermediate: int, bias: bool) -> None:
        super().__init__()
        self.intermediate = intermediate
        self.gate_up_proj = MergedLinear(hidden, [intermediate, intermediate], bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up_proj(x)))
