"""Work per stage, for the achieved rates `bench latency` prints beside the measured peak.

The vision tower's FLOPs are counted by torch's FlopCounterMode on one untimed forward of the
clip's grid (matmuls and SDPA-family attention; kernels of ours that it cannot see count as
zero, so the rate is a lower bound). The decoder's prefill FLOPs come from its config: the
linear layers (2 FLOPs per weight per token) and causal attention (QK^T and PV over each token's
prefix). The peak is a square matmul timed on the same device, in the same dtype.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode



def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """FLOP/s of an n x n x n matmul (n = 8192 on CUDA, 1024 on the CPU), median of repeats."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up (cuBLAS heuristics, CPU threads)
    samples = []
    for _ in range(repeats):
        t0 = _now(device)
        a @ b
        samples.append(2 * n**3 / (_now(device) - t0))
    return statistics.median(samples)


@torch.inference_mode()
def encoder_flops(encoder: torch.nn.Module, rows: int, row_len: int, grids: list[tuple[int, int, int]],
                  device: torch.device, dtype: torch.dtype) -> int:
    """FLOPs of one forward of a media encoder over `rows` patch rows of the given grids."""
    pixels = torch.randn(rows, row_len, device=device, dtype=dtype)
    with FlopCounterMode(display=False) as counter:
        encoder(pixels, grids)
    return int(counter.get_total_flops())


def prefill_flops(text_cfg, tokens: int) -> int:
    """Decoder FLOPs of a prefill of `tokens` tokens from an empty cache (lm_head for one row)."""
    h, i, layers = text_cfg.hidden_size, text_cfg.intermediate_size, text_cfg.num_hidden_layers
    heads, kv_heads, hd = text_cfg.num_attention_heads, text_cfg.num_key_value_heads, text_cfg.head_dim
    linear = h * heads * hd + 2 * h * kv_heads * hd + heads * hd * h + 3 * h * i  # q, k, v, o, gate/up/down
    attention = 2 * 2 * heads * hd * tokens * (tokens + 1) // 2  # QK^T and PV over each causal prefix
    return layers * (2 * linear * tokens + attention)
