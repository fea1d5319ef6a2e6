"""Memory budget: how many KV blocks the pool gets.

On the GPU the budget (default 90% of the card) is split as: weights (measured after loading;
8-bit ones with weight_quant) + an activation reserve for the largest step (the model's estimate, MultimodalLM.memory_estimate:
a prefill of `max_num_batched_tokens` tokens or one media-encoder forward of `max_vision_patches`
rows, whichever is larger, plus CUDA-graph buffers) + the KV pool (the rest). Work that would not fit is queued or refused by the scheduler, never
left to run out of memory.

On the CPU without a budget the pool has CPU_DEFAULT_KV_TOKENS tokens. A budget given there is
host memory for the same parts (weights counted from the checkpoint's shapes, no CUDA-graph
reserve): the pool shrinks to what it leaves, and a budget that cannot hold the weights and a
minimal pool is refused, as on the GPU. A kv_cache_tokens given with a budget must fit it.
"""

from __future__ import annotations

import torch

from omnistream.config import EngineConfig
from omnistream.engine.graph_limits import graph_limits
from omnistream.errors import BudgetError
from omnistream.layers.quant import dequant_scratch_bytes, saved_bytes
from omnistream.models.interface import MultimodalLM

CPU_DEFAULT_KV_TOKENS = 65536


# the smallest pool a budget must leave: 16 blocks (a short prompt and its answer)
MIN_POOL_BLOCKS = 16


def activation_reserve_bytes(model: MultimodalLM, cfg: EngineConfig, max_encoder_rows: int, itemsize: int, *, graphs: bool = True) -> int:
    """The model's peak step activations (MultimodalLM.memory_estimate) with headroom, plus the
    CUDA graphs' memory."""
    peak = model.memory_estimate(itemsize, cfg.scheduler.max_num_batched_tokens, max_encoder_rows).activation_bytes
    if cfg.encode_ahead and graphs:  # on the GPU the tower runs beside the steps (engine/encode_ahead.py): both at once
        peak = (model.memory_estimate(itemsize, cfg.scheduler.max_num_batched_tokens, 1).activation_bytes
                + model.memory_estimate(itemsize, 1, max_encoder_rows).activation_bytes)
    # 25% headroom: allocator rounding and the transient copies the estimate does not list
    # (measured: the 3B W1 run peaked 0.3% over a 10 GiB budget without it); 8-bit weights
    # add their dequantized temporary (layers/quant.py)
    graph_bytes = graph_limits(cfg.cache.memory_budget_bytes).reserve_bytes if graphs else 0  # CUDA graphs' memory
    return int(1.25 * peak) + dequant_scratch_bytes(model, itemsize) + graph_bytes


def weight_bytes(model: MultimodalLM, itemsize: int) -> int:
    """Bytes of the model's weights as loaded, counted from its config (a host budget), less
    what its 8-bit tables save (weight_quant)."""
    return model.memory_estimate(itemsize, 1, 1).weight_bytes - saved_bytes(model, itemsize)


def kv_pool_tokens(model: MultimodalLM, cfg: EngineConfig, device: torch.device, kv_bytes_per_token: int, max_vision_patches: int, transient_bytes: int = 0) -> int:
    """transient_bytes: weights that come onto the device only while used (an offloaded
    vision tower); they need room at encode time, so the KV pool cannot have it."""
    if device.type != "cuda":
        return _host_pool_tokens(model, cfg, kv_bytes_per_token, max_vision_patches)
    itemsize = torch.finfo(cfg.torch_dtype).bits // 8
    reserve = activation_reserve_bytes(model, cfg, max_vision_patches, itemsize) + transient_bytes
    encoder = cfg.cache.encoder_cache_bytes  # the encoder cache's GPU tier is part of the budget
    weights = torch.cuda.memory_allocated(device)
    if cfg.cache.kv_cache_tokens is not None:
        if cfg.cache.memory_budget_bytes is not None:  # an explicit budget still binds an explicit pool
            _check_fits(cfg.cache.memory_budget_bytes, weights, reserve, encoder, cfg.cache.kv_cache_tokens, kv_bytes_per_token)
        return cfg.cache.kv_cache_tokens
    free, total = torch.cuda.mem_get_info(device)
    budget = cfg.cache.memory_budget_bytes or int(0.9 * total)
    _check_fits(budget, weights, reserve, encoder, cfg.cache.block_size * MIN_POOL_BLOCKS, kv_bytes_per_token)
    available = min(budget - weights - reserve - encoder, free - reserve - encoder)
    tokens = available // kv_bytes_per_token
    if tokens < cfg.cache.block_size * MIN_POOL_BLOCKS:  # within the budget, but not free now
        raise BudgetError(
            f"memory budget {_size(budget)} leaves no room for the KV cache: only {_size(free)} of the GPU "
            f"is free (weights {_size(weights)}, activation reserve {_size(reserve)}, encoder cache {_size(encoder)})"
        )
    return int(tokens)


def _host_pool_tokens(model: MultimodalLM, cfg: EngineConfig, kv_bytes_per_token: int, max_vision_patches: int) -> int:
    """The pool of a CPU engine. Host allocations cannot be told apart from the rest of the
    process, so the weights are counted from the config; there are no CUDA graphs."""
    requested, budget = cfg.cache.kv_cache_tokens, cfg.cache.memory_budget_bytes
    if budget is None:
        return CPU_DEFAULT_KV_TOKENS if requested is None else requested
    itemsize = torch.finfo(cfg.torch_dtype).bits // 8
    weights = weight_bytes(model, itemsize)
    reserve = activation_reserve_bytes(model, cfg, max_vision_patches, itemsize, graphs=False)
    encoder = cfg.cache.encoder_cache_bytes
    pool = requested if requested is not None else cfg.cache.block_size * MIN_POOL_BLOCKS
    _check_fits(budget, weights, reserve, encoder, pool, kv_bytes_per_token)
    if requested is not None:
        return requested
    return int(min(CPU_DEFAULT_KV_TOKENS, (budget - weights - reserve - encoder) // kv_bytes_per_token))


def _check_fits(budget: int, weights: int, reserve: int, encoder: int, kv_tokens: int, kv_bytes_per_token: int) -> None:
    """BudgetError naming the budget and every part it must hold, when they do not fit."""
    kv = kv_tokens * kv_bytes_per_token
    need = weights + reserve + encoder + kv
    if need > budget:
        raise BudgetError(
            f"memory budget {_size(budget)} is too small: it needs at least {_size(need)} (weights {_size(weights)}, "
            f"activation reserve {_size(reserve)}, encoder cache {_size(encoder)}, KV cache of {kv_tokens} tokens {_size(kv)})"
        )


def _size(n: int) -> str:
    """Bytes in the largest unit that keeps a digit before the point (1000 B, 3.20 MiB, 9.72 GiB)."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if abs(n) >= 1 << shift:
            return f"{n / (1 << shift):.2f} {unit}"
    return f"{n} B"
