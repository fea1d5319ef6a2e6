"""Weight-only 8-bit quantization of the language model (small-GPU mode: opt-in, lossy).

`quantize_model(model, mode, device)` runs once, after the weights are loaded. It replaces every
nn.Linear and nn.Embedding of the model outside its media encoders (the decoder's qkv / o /
gate_up / down projections, the LM head and the token embedding) by modules that keep an 8-bit
weight (out, in) and one scale per output row, in the compute dtype:

  int8  symmetric: scale = max|w_row| / 127, q = round(w / scale) in [-127, 127]
  fp8   float8_e4m3fn: scale = max|w_row| / 448 (the format's largest normal), q = w / scale

The media encoders (vision and audio towers; MultimodalLM.media_encoder) stay in the compute
dtype: their matmuls are compute-bound, and they are the model's own exactness hot spot. A tied
LM head and embedding share one 8-bit table (the embedding's rows are the head's output rows, so
the per-row scale serves both): the 3B's 151936 x 2048 table goes from 622 MB to 311 MB,
where an int8 head beside a bf16 embedding would add 311 MB.

Activations stay in the compute dtype (weight-only): x @ (q * scale).T. QuantLinear's forward:
- CUDA, at most GEMV_MAX_ROWS rows (decode batches, the LM head of sampled rows): a Triton
  kernel reads the 8-bit weight directly (layers/triton_quant.py), 1 byte per weight instead of 2;
- CPU, int8: PyTorch's int8 weight kernel (torch._weight_int8pack_mm), no dequantized copy;
- otherwise: dequantize to the compute dtype and matmul (cuBLAS), in row chunks of at most
  DEQUANT_CHUNK_ELEMENTS so the temporary stays bounded (the LM head would need 622 MB); it is an
  ordinary allocation, so CUDA-graph capture keeps it in the graph's pool.
"""

from __future__ import annotations

import gc

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from omnistream.errors import ConfigError

log = logging.getLogger(__name__)

# mode -> (storage dtype, largest representable magnitude)
FORMATS: dict[str, tuple[torch.dtype, float]] = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}
WEIGHT_QUANT_MODES = tuple(FORMATS)
# rows of W dequantized at once: 64M weights = 128 MB in bf16 (the 3B's gate_up, 45M, in one go)
DEQUANT_CHUNK_ELEMENTS = 1 << 26
GEMV_MAX_ROWS = 64  # up to this many rows the Triton kernel reads the 8-bit weight (GPU; triton_quant.MAX_ROWS)
_QUANT_CHUNK_ELEMENTS = 1 << 24  # float32 working set while quantizing (64 MB)


def check_mode(mode: str | None) -> None:
    if mode is not None and mode not in FORMATS:
        raise ConfigError(f"weight_quant must be one of {', '.join(WEIGHT_QUANT_MODES)} (or unset: weights in the compute dtype), got {mode!r}")


# ---------------------------------------------------------------------------------- tensors
@torch.no_grad()
def quantize_rows(w: torch.Tensor, mode: str, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w: (out, in) float -> q (out, in) in the mode's storage dtype, scale (out,) scale_dtype.
    The scale is rounded to its dtype first and q computed from the rounded scale, so
    q * scale is the stored weight's best approximation. All-zero rows (padding) get scale 1."""
    check_mode(mode)
    qdtype, qmax = FORMATS[mode]
    q = torch.empty(w.shape, dtype=qdtype, device=w.device)
    scale = torch.empty(w.shape[0], dtype=scale_dtype, device=w.device)
    step = max(1, _QUANT_CHUNK_ELEMENTS // max(1, w.shape[1]))
    for s in range(0, w.shape[0], step):
        rows = w[s : s + step].float()
        sc = (rows.abs().amax(dim=1) / qmax).to(scale_dtype)
        sc = torch.where(sc > 0, sc, torch.ones_like(sc))
        x = (rows / sc.float()[:, None]).clamp_(-qmax, qmax)
        q[s : s + step] = x.round_() if qdtype == torch.int8 else x
        scale[s : s + step] = sc
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q (out, in), scale (out,) -> (out, in) in scale's dtype."""
    return q.to(scale.dtype) * scale[:, None]


def dequant_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) @ (q * scale).T + bias -> (..., out), the weight dequantized DEQUANT_CHUNK_ELEMENTS
    at a time (one chunk for all but the largest matrices)."""
    n, k = q.shape
    step = max(1, DEQUANT_CHUNK_ELEMENTS // k)
    if step >= n:
        return F.linear(x, dequantize_rows(q, scale), bias)
    out = x.new_empty(*x.shape[:-1], n)
    for s in range(0, n, step):
        e = min(n, s + step)
        out[..., s:e] = F.linear(x, dequantize_rows(q[s:e], scale[s:e]), None if bias is None else bias[s:e])
    return out


_TRITON = {"usable": True}


def triton_kernel_in_use() -> bool:
    """False once the 8-bit Triton kernel has failed in this process (see _disable_triton)."""
    return _TRITON["usable"]


def _disable_triton(err: Exception) -> None:
    """The 8-bit kernel failed to build or launch (first use is eager: warm-up, never inside a
    graph capture): every later call dequantizes instead, slower but the same math."""
    _TRITON["usable"] = False
    log.warning("8-bit Triton linear unavailable (%s: %s); dequantize-then-matmul from now on", type(err).__name__, err)


def _cpu_int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """PyTorch's CPU int8 weight kernel: no dequantized copy (6-25x faster than dequantizing
    the tiny model's LM head each step); x @ q.T accumulated in float32, then times the scale."""
    out = torch._weight_int8pack_mm(x.reshape(-1, q.shape[1]).contiguous(), q, scale.to(x.dtype))
    out = out.view(*x.shape[:-1], q.shape[0])
    return out if bias is None else out + bias


# ---------------------------------------------------------------------------------- modules
class _QuantTable(nn.Module):
    """An 8-bit (rows, cols) table with a per-row scale. The 8-bit values are stored as raw
    bytes (uint8; fp8 viewed back at use) so that a model-wide .to(dtype) cannot turn them into
    floats without their scale. `scale` is registered first: code that reads the model's dtype
    from its first parameter finds the compute dtype."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.scale = nn.Parameter(scale, requires_grad=False)  # (rows,) compute dtype
        self.qdata = nn.Parameter(q.view(torch.uint8) if q.dtype != torch.int8 else q, requires_grad=False)
        self.qdtype = q.dtype

    @property
    def qweight(self) -> torch.Tensor:
        """(rows, cols) in the storage dtype (int8 or float8_e4m3fn)."""
        return self.qdata if self.qdtype == torch.int8 else self.qdata.view(self.qdtype)


class QuantLinear(_QuantTable):
    """nn.Linear with a weight-only 8-bit weight (see the module docstring)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(q, scale)
        self.out_features, self.in_features = q.shape
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.numel() // self.in_features <= GEMV_MAX_ROWS and triton_kernel_in_use():
            from omnistream.layers.triton_quant import supports, w8_linear  # lazy: Triton exists only with CUDA

            if supports(self.qdtype, x):
                try:
                    return w8_linear(x, self.qweight, self.scale, self.bias)
                except Exception as e:  # noqa: BLE001 - a Triton that cannot build it: the cuBLAS path still works
                    _disable_triton(e)
        elif not x.is_cuda and self.qdtype == torch.int8:
            return _cpu_int8_linear(x, self.qweight, self.scale, self.bias)
        return dequant_linear(x, self.qweight, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={self.qdtype}, bias={self.bias is not None}"


class QuantEmbedding(_QuantTable):
    """nn.Embedding over an 8-bit table: rows dequantized as they are looked up."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qdata[ids]  # index the raw bytes: gathers of float8 are not on every backend
        if self.qdtype != torch.int8:
            rows = rows.view(self.qdtype)
        return rows.to(self.scale.dtype) * self.scale[ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.qdata.shape[0]}, {self.qdata.shape[1]}, weight={self.qdtype}"


# ---------------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class QuantReport:
    """What quantize_model changed."""

    mode: str
    modules: int  # modules replaced (a tied head and embedding count two)
    tables: int  # distinct 8-bit tables (a tied head and embedding share one)
    bytes_before: int  # the replaced weights in the compute dtype, each table once
    bytes_after: int  # their 8-bit tables and scales


def _encoder_modules(model: nn.Module) -> set[int]:
    """ids of every module inside the model's media encoders (they stay in the compute dtype)."""
    find = getattr(model, "media_encoder", None)
    out: set[int] = set()
    for kind in ("image", "video", "audio"):
        enc = find(kind) if find is not None else None
        if enc is not None:
            out.update(id(m) for m in enc.modules())
    return out


def quant_targets(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of every nn.Linear / nn.Embedding outside the media encoders."""
    skip = _encoder_modules(model)
    out = []
    for parent in model.modules():
        if id(parent) in skip:
            continue
        for attr, child in parent.named_children():
            if id(child) not in skip and isinstance(child, (nn.Linear, nn.Embedding)):
                out.append((parent, attr, child))
    return out


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, device: torch.device | str | None = None) -> QuantReport:
    """Replaces the model's language-model Linear / Embedding modules by 8-bit ones, in place,
    and moves the model to `device` (default: where it is). Each matrix is quantized on
    `device` one at a time, so a model loaded on the host reaches a small card 8-bit, never in
    full precision. Tied weights (one Parameter in two modules) become one shared table."""
    check_mode(mode)
    tables: dict[int, _QuantTable] = {}  # id(weight Parameter) -> the first module made from it
    before = after = replaced = 0
    w = mod = parent = first = None
    for parent, attr, mod in quant_targets(model):
        w = mod.weight
        dev = device or w.device
        first = tables.get(id(w))
        q, s = (first.qweight, first.scale.data) if first is not None else quantize_rows(w.detach().to(dev), mode, w.dtype)
        if isinstance(mod, nn.Embedding):
            new = QuantEmbedding(q, s)
        else:
            new = QuantLinear(q, s, None if mod.bias is None else mod.bias.detach().to(dev))
        if first is None:
            tables[id(w)] = new
            before += w.numel() * w.element_size()
            after += q.numel() * q.element_size() + s.numel() * s.element_size()
        else:  # tied: the same Parameters, so .to(device) and parameters() see the table once
            new.qdata, new.scale = first.qdata, first.scale
        setattr(parent, attr, new)
        replaced += 1
    if device is not None:
        model.to(device)
    # the replaced modules can sit in reference cycles: collected now, not at some later gc
    # pass, or the card still holds the full-precision weights when the KV pool is sized
    # (measured: a 6 GiB budget saw 7.5 GiB of "weights" on the H200)
    del w, mod, parent, first
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the full-precision weights' blocks go back to the card
    return QuantReport(mode, replaced, len(tables), before, after)


def quantized_tables(model: nn.Module) -> list[_QuantTable]:
    """The model's distinct 8-bit tables (a shared one once)."""
    seen: dict[int, _QuantTable] = {}
    for m in model.modules():
        if isinstance(m, _QuantTable):
            seen.setdefault(id(m.qdata), m)
    return list(seen.values())


def saved_bytes(model: nn.Module, itemsize: int) -> int:
    """Bytes the 8-bit tables save against their weights in a dtype of `itemsize` bytes (the
    host budget counts weights from the checkpoint's shapes, then subtracts this)."""
    return sum(t.qdata.numel() * (itemsize - 1) - t.scale.numel() * t.scale.element_size() for t in quantized_tables(model))


def dequant_scratch_bytes(model: nn.Module, itemsize: int) -> int:
    """The largest dequantized temporary of one QuantLinear forward (the activation reserve
    holds it): a whole matrix, or one chunk of a large one; none for int8 on the host (its
    kernel reads the int8 weight)."""
    sizes = [min(m.qdata.numel(), DEQUANT_CHUNK_ELEMENTS) for m in model.modules()
             if isinstance(m, QuantLinear) and (m.qdata.is_cuda or m.qdtype != torch.int8)]
    return itemsize * max(sizes, default=0)
