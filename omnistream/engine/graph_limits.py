"""How large the CUDA graphs get, and the device memory they hold (a memory budget reserves it).

Two sets. FULL, the default: row-batch graphs up to 1024 rows (a burst of short questions joins
the running batch in one graphed step; an eager step of many short chunks ran ~0.6 s on the
H200) and vision graphs of single items up to 4096 patches (a short clip, (4, 32, 32) at
448x448). SMALL, under a memory budget (the small-GPU mode): 256 rows and 2048 patches, the
set the 6 GiB W1 run was measured with (peak 5.63 GiB; its KV pool of 11k tokens would lose
~7k tokens to FULL's larger reserve and no longer hold the conversation).

The reserves are estimates from the activations, not measurements: SMALL's 384 MiB is row
graphs of 256 rows (~25 MB of activations, 64 MB of split-K scratch, ~20 MB of in-graph logits
for 64 rows) and two vision graphs of one 448x448 patch (~50 MB each) with allocator rounding;
FULL adds ~4x the row activations (1024 rows) and two vision graphs of ~200 MB (4096 patches).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GraphLimits:
    rows: int  # row-batch graphs (engine/cuda_graphs.py) up to this many rows
    vision_patches: int  # vision graphs (engine/vision_graphs.py) of one item up to this many patches
    reserve_bytes: int  # the memory their captures hold (cache/budget.py reserves it)


FULL = GraphLimits(rows=1024, vision_patches=4096, reserve_bytes=640 << 20)
SMALL = GraphLimits(rows=256, vision_patches=2048, reserve_bytes=384 << 20)


def graph_limits(memory_budget_bytes: int | None) -> GraphLimits:
    """SMALL under a memory budget, else FULL."""
    return SMALL if memory_budget_bytes is not None else FULL
