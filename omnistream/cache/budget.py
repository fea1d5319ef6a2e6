"""Memory budget: how many KV blocks the pool gets.

On the GPU the budget (default 90% of the card) is split as: weights (measured after loading)
+ an activation reserve for the largest step (a vision chunk of `max_vision_patches` patches or
a prefill of `max_num_batched_tokens` tokens, whichever is larger, plus CUDA-graph buffers) +
the KV pool (the rest). Work that would not fit is queued or refused by the scheduler, never
left to run out of memory.
"""

from __future__ import annotations

import torch

from omnistream.config import EngineConfig
from omnistream.errors import BudgetError
from omnistream.models.hf_config import QwenVLConfig

CPU_DEFAULT_KV_TOKENS = 65536
# CUDA-graph memory: row-batch graphs up to 256 rows (activations ~25 MB, split-K scratch 64 MB,
# in-graph logits of 64 rows ~20 MB) and at most 2 vision graphs of one temporal patch (~50 MB
# each at 448x448), with allocator rounding
GRAPH_RESERVE_BYTES = 384 << 20


def activation_reserve_bytes(mcfg: QwenVLConfig, cfg: EngineConfig, max_vision_patches: int, itemsize: int) -> int:
    t, v = mcfg.text, mcfg.vision
    n = cfg.scheduler.max_num_batched_tokens
    # prefill: gate_up output + activation product + a few hidden-sized buffers + qkv, per token
    prefill = n * (3 * t.intermediate_size + 8 * t.hidden_size) * itemsize
    # vision: same pattern per patch, plus the float32 rotary tables and merger input
    vision = max_vision_patches * (3 * v.intermediate_size + 10 * v.hidden_size) * itemsize
    # 25% headroom: allocator rounding and the transient copies the estimate does not list
    # (measured: the 3B W1 run peaked 0.3% over a 10 GiB budget without it)
    return int(1.25 * max(prefill, vision)) + GRAPH_RESERVE_BYTES


def kv_pool_tokens(mcfg: QwenVLConfig, cfg: EngineConfig, device: torch.device, kv_bytes_per_token: int, max_vision_patches: int, transient_bytes: int = 0) -> int:
    """transient_bytes: weights that come onto the device only while used (an offloaded
    vision tower); they need room at encode time, so the KV pool cannot have it."""
    if cfg.cache.kv_cache_tokens is not None:
        return cfg.cache.kv_cache_tokens
    if device.type != "cuda":
        return CPU_DEFAULT_KV_TOKENS
    free, total = torch.cuda.mem_get_info(device)
    weights = torch.cuda.memory_allocated(device)
    budget = cfg.cache.memory_budget_bytes or int(0.9 * total)
    itemsize = torch.finfo(cfg.torch_dtype).bits // 8
    reserve = activation_reserve_bytes(mcfg, cfg, max_vision_patches, itemsize) + transient_bytes
    encoder = cfg.cache.encoder_cache_bytes  # the encoder cache's GPU tier is part of the budget
    available = min(budget - weights - reserve - encoder, free - reserve - encoder)
    tokens = available // kv_bytes_per_token
    if tokens < cfg.cache.block_size * 16:
        raise BudgetError(
            f"memory budget {budget / 2**30:.2f} GiB leaves no room for the KV cache "
            f"(weights {weights / 2**30:.2f} GiB, activation reserve {reserve / 2**30:.2f} GiB, "
            f"encoder cache {encoder / 2**30:.2f} GiB)"
        )
    return int(tokens)
