"""Typed engine configuration, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from omnistream.errors import ConfigError
from omnistream.layers.quant import check_mode as _check_weight_quant

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    enable_prefix_caching: bool = True  # share full KV blocks across requests by content name
    session_kv_budget_tokens: int | None = None  # KV a session keeps pinned between turns; None: all
    kv_cache_tokens: int | None = None  # KV pool size in tokens; None: derived from the memory budget
    memory_budget_bytes: int | None = None  # everything the engine may use on the device; None: 90% of free
    encoder_cache_bytes: int = 0  # device bytes for cached vision embeddings per temporal patch; 0: off
    encoder_cache_cpu_bytes: int = 0  # host bytes of the encoder cache's CPU tier (GPU evictions go there); 0: none

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        if self.encoder_cache_bytes < 0 or self.encoder_cache_cpu_bytes < 0:
            raise ConfigError("encoder_cache_bytes and encoder_cache_cpu_bytes must be >= 0")
        if self.memory_budget_bytes is not None and not self.memory_budget_bytes > 0:
            raise ConfigError(f"memory_budget_bytes must be positive (or None: derived from the device), got {self.memory_budget_bytes}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise ConfigError(f"kv_cache_tokens must hold at least one block, got {self.kv_cache_tokens}")


DEFAULT_VISION_SLICE_ROWS = 16384  # EngineConfig.vision_slice_rows on a GPU

PREFILL_CAP_SCOPES = ("per_request", "per_step", "each_request")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 8192  # token budget of one forward (prefill chunks + decodes)
    max_num_seqs: int = 64  # sequences running at once
    enable_chunked_prefill: bool = True  # split long prompts across steps under the budget
    # while any sequence decodes, a step holds at most this many tokens for each request in prefill
    # (see prefill_cap_scope; decodes included, prefill and so media encoding done per chunk get
    # at least 16), so one user's long clip, chunked, never stalls every running answer
    # (128: H200, 3B, 16 streams beside a 64-frame clip's 256-token chunks at up to 8k context:
    # inter-token p99 12.9 -> 8.0 ms; 32 concurrent 8-frame questions' TTFT p99 1,446-1,605 ->
    # 1,398 ms, both with sliced encode-ahead; a question shorter than a cap is one chunk anyway)
    max_step_tokens_while_decoding: int = 128
    # what max_step_tokens_while_decoding counts, per_request or per_step: per_request gives one
    # cap to each request in prefill (running mid-prompt, or waiting with a free sequence slot),
    # pooled: the step's prefill takes up to (requests in prefill) x the cap, requests served in
    # order, so a burst of short prompts joins the running batch in one step (a single long
    # prompt alone still gets one cap per step); per_step gives one cap to the whole step;
    # each_request pools like per_request but no request's chunk takes more than one cap, so
    # short questions get past a long prompt's prefill (opt-in: not measured on a GPU yet)
    prefill_cap_scope: str = "per_request"
    # unset follows engine/graph_limits.py so such steps replay as graphs (a larger mixed step of
    # many short prompts ran eagerly at ~0.6 s on the H200)
    # a prompt chunk's queries each read its whole context: past this many context tokens, a
    # chunk while any sequence decodes gets max_step_tokens_while_decoding x this / its context
    # (at least 16), so its attention costs a running answer's step what a chunk at this context
    # does (a 64-frame clip's 256-token chunks went from 6.1 to 9.7 ms steps as its context
    # reached 8k: H200, 3B); unset: off (opt-in: not measured yet)
    prefill_context_tokens_while_decoding: int | None = None  # past this many context tokens, a prompt chunk while others decode shrinks in proportion (its attention cost per step stays that of this context); unset: off
    max_prefill_tokens_while_decoding: int | None = None  # tokens a step holds while any sequence decodes, decodes included, per_request's pool; unset: the largest CUDA graph's rows, 1024, or 256 under a memory budget

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_step_tokens_while_decoding", "max_prefill_tokens_while_decoding",
                     "prefill_context_tokens_while_decoding"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.prefill_cap_scope not in PREFILL_CAP_SCOPES:
            raise ConfigError(f"prefill_cap_scope must be one of {', '.join(PREFILL_CAP_SCOPES)}, got {self.prefill_cap_scope!r}")


def _check_device(device: str) -> None:
    """The device must exist here: otherwise the first allocation on it fails deep inside torch
    (a CPU-only build raises a bare AssertionError) after the checkpoint has been read."""
    kind, sep, index = device.partition(":") if isinstance(device, str) else ("", "", "")
    if not (device == "cpu" or (kind == "cuda" and (not sep or index.isdigit()))):
        raise ConfigError(f"device must be cpu or cuda[:i], got {device!r}")
    if kind != "cuda":
        return
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, no GPU visible"
        raise ConfigError(f"device {device!r}: CUDA is not available (torch {torch.__version__}, {build}); use device cpu")
    count = torch.cuda.device_count()
    if sep and int(index) >= count:
        raise ConfigError(f"device {device!r}: no such GPU; this machine has {count} (cuda:0 .. cuda:{count - 1})")


@dataclass(frozen=True)
class EngineConfig:
    model: str  # checkpoint directory, or "demo" for the built-in random-weight model
    device: str = "cpu"  # "cpu" or "cuda[:i]"
    dtype: str = "auto"  # float32 | bfloat16 | float16 | auto (bf16 on GPU, fp32 on CPU)
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    cuda_graphs: bool = True  # capture decode steps as CUDA graphs (GPU only)
    offload_vision: bool = False  # keep the vision tower in host memory between encodes (GPU only)
    # launch the next greedy decode step before reading the last one's tokens, so the host's
    # per-step work overlaps the GPU's (lossless; needs the row-batch path of cuda_graphs)
    overlap_decode: bool = True
    # run the engine core (scheduler, model, KV cache) in its own process: the caller's threads
    # (a server's HTTP work, media decoding) then never hold the interpreter lock the engine
    # loop needs to launch steps (engine/core_process.py)
    engine_process: bool = False  # run the engine core in its own process, off the caller's interpreter lock
    # encode media before the steps that reach them, on a side CUDA stream, in forwards of up to
    # max_vision_patches rows; a prompt is scheduled up to its first media token not encoded yet
    # (lossless; engine/encode_ahead.py). Off by default: on the H200 it made both of its target
    # workloads worse (see the module's note), until vision launches stop blocking the host
    encode_ahead: bool = False
    # while answers decode, encode media ahead of their steps on the engine's own stream, a few
    # vision blocks per decode step: about this many pixel rows x blocks per step for each
    # request the group encodes for (16384, one clip: one block per step of its group of 16k
    # rows or more; a group under 4096 rows counts as 4096: 4 blocks of one image, at least one
    # block always). Unset: 16384 on a GPU (H200, 3B:
    # 16 streams' inter-token p99 beside a 64-frame clip 21.5 -> 12.9 ms, 32 concurrent 8-frame
    # questions' TTFT p99 1,665 -> 1,446 ms, 1,605 in a second run), off on the CPU, with encode_ahead and with
    # offload_vision (the tower would move every step); 0: off
    # (engine/encode_ahead.py, "Sliced"; lossless)
    vision_slice_rows: int | None = None  # pixel rows x vision blocks encoded per decode step and waiting request while answers decode (media encoded ahead, on the engine's stream); unset: 16384 on a GPU, off on the CPU; 0: off
    weight_quant: str | None = None  # lossy small-GPU mode: int8 or fp8 weights for the LLM's linear layers, LM head and embedding (media encoders stay in dtype); unset: off

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(_DTYPES)} or auto, got {self.dtype!r}")
        _check_weight_quant(self.weight_quant)
        if self.vision_slice_rows is not None and self.vision_slice_rows < 0:
            raise ConfigError(f"vision_slice_rows must be >= 0 (0: off; unset: the device's default), got {self.vision_slice_rows}")
        if self.vision_slice_rows and self.encode_ahead:
            raise ConfigError("vision_slice_rows and encode_ahead are two ways to encode ahead: set one")
        if self.vision_slice_rows and self.offload_vision:
            raise ConfigError("vision_slice_rows needs the vision tower on the device between steps; offload_vision moves it to the host")
        _check_device(self.device)

    @property
    def vision_slices(self) -> int | None:
        """vision_slice_rows in effect: None when off."""
        if self.vision_slice_rows is None:
            on_gpu = self.device.startswith("cuda") and not (self.encode_ahead or self.offload_vision)
            return DEFAULT_VISION_SLICE_ROWS if on_gpu else None
        return self.vision_slice_rows or None

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        return _DTYPES[self.dtype]

    @staticmethod
    def from_kwargs(model: str, **kwargs) -> "EngineConfig":
        """Accepts flat keyword arguments (block_size=..., max_num_seqs=...); unknown keys fail."""
        sub = {"cache": CacheConfig, "scheduler": SchedulerConfig}
        top, parts = {}, {k: {} for k in sub}
        for key, value in kwargs.items():
            owner = next((k for k, cls in sub.items() if key in {f.name for f in fields(cls)}), None)
            if owner:
                parts[owner][key] = value
            elif key in {f.name for f in fields(EngineConfig)}:
                top[key] = value
            else:
                raise ConfigError(f"unknown engine option {key!r}")
        return EngineConfig(model=model, cache=CacheConfig(**parts["cache"]), scheduler=SchedulerConfig(**parts["scheduler"]), **top)
