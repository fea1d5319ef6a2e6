"""Building the engine's device side: the model with its weights, then the LLMEngine over it
(8-bit weights, vision offload, KV pool sized to the memory budget, encoder cache, CUDA graphs).

The Python API (entrypoints/api.py) calls these in its own process; an engine process
(engine/core_process.py) calls the same functions in the child, so both build exactly the same
engine. A `ModelRecipe` says how to make the model with its weights: a module-level function
and plain arguments, so it travels to a spawned process by reference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from omnistream.cache.budget import kv_pool_tokens
from omnistream.cache.encoder_cache import EncoderCache
from omnistream.config import EngineConfig
from omnistream.engine.graph_limits import graph_limits
from omnistream.engine.llm_engine import LLMEngine
from omnistream.layers.quant import quantize_model
from omnistream.models.interface import MultimodalLM

log = logging.getLogger(__name__)

MAX_VISION_PATCHES = 16384


def build_model(model_class: type, mcfg, device: torch.device, dtype: torch.dtype) -> MultimodalLM:
    """Allocates the model directly on `device` in `dtype` (weights uninitialised until loaded;
    on the `meta` device no memory at all: enough for positions and the config)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(mcfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def checkpoint_model(model_dir: Path, cfg: EngineConfig, device: str | None = None) -> MultimodalLM:
    """The model of a checkpoint directory with its weights, on cfg.device (`device`: another
    one; "meta": the shape only, no weights read)."""
    from omnistream.models.loader import load_weights
    from omnistream.models.registry import resolve

    entry = resolve(model_dir)
    if device == "meta":
        return build_model(entry.model_class, entry.read_config(model_dir), torch.device("meta"), cfg.torch_dtype)
    # quantized weights are made on the device one matrix at a time from a host copy, so the
    # full-precision model never has to fit the card
    build_on = device or ("cpu" if cfg.weight_quant is not None else cfg.device)
    net = build_model(entry.model_class, entry.read_config(model_dir), torch.device(build_on), cfg.torch_dtype)
    load_weights(net, model_dir)
    return net


@dataclass(frozen=True)
class ModelRecipe:
    """How a process makes the model with its weights: `build(*args, cfg)`. `build` must be a
    module-level function (pickled by reference: an engine process runs it after spawn)."""

    build: Callable[..., MultimodalLM]
    args: tuple[Any, ...] = ()

    def __call__(self, cfg: EngineConfig) -> MultimodalLM:
        return self.build(*self.args, cfg)


def build_llm(model: MultimodalLM, cfg: EngineConfig) -> LLMEngine:
    """The LLMEngine over `model` (on cfg.device with its weights): quantizes the weights if
    asked, sizes the KV pool to what the budget leaves, adds the encoder cache and CUDA graphs."""
    device = torch.device(cfg.device)
    if cfg.weight_quant is not None:  # before sizing the KV pool: the budget sees 8-bit weights
        report = quantize_model(model, cfg.weight_quant, device)
        log.info("weight_quant %s: %d modules, %d tables, %.2f GiB -> %.2f GiB", report.mode, report.modules,
                 report.tables, report.bytes_before / 2**30, report.bytes_after / 2**30)
    offload = None
    if cfg.offload_vision and device.type == "cuda":  # before sizing the KV pool
        from omnistream.engine.vision_offload import VisionOffloader

        offload = VisionOffloader(model.media_encoder("video"), device)
    per_token = model.kv_spec.bytes_per_token(cfg.torch_dtype)
    tokens = kv_pool_tokens(model, cfg, device, per_token, MAX_VISION_PATCHES, offload.bytes if offload else 0)
    num_blocks = tokens // cfg.cache.block_size
    llm = LLMEngine(model, cfg, num_blocks)
    llm.runner.max_vision_patches = MAX_VISION_PATCHES
    llm.runner.vision_offload = offload
    if cfg.cache.encoder_cache_bytes > 0:
        llm.runner.encoder_cache = EncoderCache(cfg.cache.encoder_cache_bytes, cfg.cache.encoder_cache_cpu_bytes)
    if device.type == "cuda" and cfg.cuda_graphs:
        limits = graph_limits(cfg.cache.memory_budget_bytes)  # smaller under a memory budget (its reserve)
        llm.runner.enable_cuda_graphs(max_context=32768, max_rows=limits.rows, vision_patches=limits.vision_patches)
    log.info("KV pool: %d blocks of %d tokens (%.2f GiB)", num_blocks, cfg.cache.block_size,
             num_blocks * cfg.cache.block_size * per_token / 2**30)
    return llm
