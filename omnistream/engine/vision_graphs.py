"""CUDA graphs of the vision tower for grids that recur.

A live camera encodes one 2-frame patch of the same size at every step. Eagerly that is ~1000
kernel launches (32 blocks), ~35 ms of host time on an H100 machine for ~3 ms of GPU work.
The second time an item's grid (k, h, w) of at most MAX_PATCHES patches is seen, its forward is
captured with static input and output buffers and replayed from then on: a live camera's
2-frame patch (1, h, w), and the short clips of many users asking at once (32 clients with
8-frame 448x448 clips: grid (4, 32, 32), one per step while others decode, ~40 ms of a step
eagerly on the H200 host). A grid must recur to be captured, so varying runs of a long clip's
patches do not make the few kept graphs evict each other; larger inputs' GPU time hides the
launch cost anyway. Replays compute exactly the eager function
(same kernels, same layout); the output is copied out of the static buffer. A few grid lists
are kept (least recently used out).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from omnistream.engine.graph_limits import FULL

MAX_PATCHES = FULL.vision_patches  # the default size; larger inputs run eagerly: their GPU time hides the launch cost
MAX_GRAPHS = 2  # each keeps its activations (~50 MB for one 448x448 2-frame patch, ~200 MB at MAX_PATCHES)


class _Captured:
    def __init__(self, visual, pixels: torch.Tensor, grids: tuple) -> None:
        self.layout = visual.layout(list(grids), pixels.device)  # the tower's own index tables
        self.input = torch.zeros_like(pixels)
        # captured with the kernels an eager forward of this size runs (below
        # fused._COMPILE_MIN_ROWS rows the eager ones, at it the compiled ones): a replay is
        # then bit for bit the eager forward (the first sighting is encoded eagerly)
        for _ in range(2):  # warm up (cuBLAS handles) outside the graph
            visual(self.input, list(grids), self.layout)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the engine's other threads (an engine process's receiver pins incoming
        # media) keep their CUDA calls during a capture; in the default global mode such a call
        # is refused while any stream captures, and killed the engine process under bench serve
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.output = visual(self.input, list(grids), self.layout)

    def run(self, pixels: torch.Tensor) -> torch.Tensor:
        self.input.copy_(pixels)
        self.graph.replay()
        return self.output.clone()


class VisionGraphs:
    def __init__(self, visual, max_patches: int | None = None) -> None:
        self.visual = visual
        self.max_patches = max_patches or MAX_PATCHES  # larger inputs run eagerly (engine/graph_limits.py)
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self.seen: set[tuple] = set()
        self.replays = 0

    @torch.inference_mode()
    def run(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor | None:
        """(P, 1176) pixels on the device, in the tower's dtype -> embeddings, or None when this
        input should run eagerly (first sighting of its grids, or too large)."""
        key = (tuple(tuple(g) for g in grids), pixels.dtype)
        if len(grids) != 1 or pixels.shape[0] > self.max_patches:
            return None
        cap = self.graphs.get(key)
        if cap is None:
            if key not in self.seen:
                self.seen.add(key)
                return None
            cap = _Captured(self.visual, pixels, key[0])
            self.graphs[key] = cap
            if len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        self.replays += 1
        return cap.run(pixels)
