"""RMSNorm as Qwen2 computes it: statistics in float32, scale applied after casting back."""

from __future__ import annotations

import torch
from torch import nn

from omnistream.layers.fused import add_rms_norm, rms_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., D); float32 statistics keep bf16 runs close to the reference
        return rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (x + residual, norm(x + residual)) in one kernel on the GPU."""
        return add_rms_norm(x, residual, self.weight, self.eps)
