"""Fused elementwise kernels for the GPU (torch.compile'd small functions).

Eager PyTorch runs RMSNorm as ~8 kernels, rotary as ~10 and SiLU-and-mul as 2: at decode time
that is ~40 launches per layer (launch-bound), at prefill several extra passes over large
activations (bandwidth-bound). Each function below compiles to one Triton kernel. They compute
the same math as the eager versions; on the CPU the eager versions run (tests stay
compiler-free and exact).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + residual, rms_norm(x + residual)): the residual add fused into the next norm."""
    h = x + residual
    return h, _rms_norm(h, weight, eps)


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, upcast: bool):
    """q: (N, H, D), k: (N, KVH, D), cos/sin: (N, D). upcast: rotate in float32 (vision)."""
    def rot(x):
        xf = x.float() if upcast else x
        x1, x2 = xf.chunk(2, dim=-1)
        out = xf * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]
        return out.to(x.dtype)
    return rot(q), rot(k)


_compiled: dict[str, object] = {}


def _get(name: str, fn):
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=True)
    return _compiled[name]


# Below this many rows an eager call is cheaper on the host than a compiled one (the compiled
# wrapper's guards cost ~0.1 ms, ~0.3 s per 36-layer step of a follow-up question), unless a CUDA
# graph is being captured: then host cost vanishes at replay and fewer kernels win. Measured on
# the H100 host for a 2.6k-token re-prefill over a 5k context (tools/gpu_eager_threshold.py):
# compiled 61 ms median but 58-111 ms (guard misses recompile for new lengths), eager 67-68 ms
# every time; long prefills (8k video prompts) keep the compiled kernels.
_COMPILE_MIN_ROWS = 4096


_force = False


@contextmanager
def compiled_kernels():
    """Use the compiled kernels at any size (CUDA-graph warm-up and capture)."""
    global _force
    previous, _force = _force, True
    try:
        yield
    finally:
        _force = previous


def _use_compiled(x: torch.Tensor) -> bool:
    return x.is_cuda and (_force or x.shape[0] >= _COMPILE_MIN_ROWS)


def rms_norm(x, weight, eps):
    return _get("rms", _rms_norm)(x, weight, eps) if _use_compiled(x) else _rms_norm(x, weight, eps)


def add_rms_norm(x, residual, weight, eps):
    return _get("add_rms", _add_rms_norm)(x, residual, weight, eps) if _use_compiled(x) else _add_rms_norm(x, residual, weight, eps)


def silu_mul(gate_up):
    return _get("silu_mul", _silu_mul)(gate_up) if _use_compiled(gate_up) else _silu_mul(gate_up)


def rope_qk(q, k, cos, sin, upcast: bool = False):
    if _use_compiled(q):
        return _get(f"rope{upcast}", _rope_qk)(q, k, cos, sin, upcast)
    return _rope_qk(q, k, cos, sin, upcast)
