"""Keep the vision tower off the GPU while it is idle (the seeds' "release the encoder after
use"): its weights live in page-locked host memory and are copied in for each encode.

On a small GPU this frees the tower's weights (1.3 GB for the 3B/7B towers in bf16) for KV
blocks; the price is one host-to-device copy per encode step, measured in `load_s`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
from torch import nn


class VisionOffloader:
    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.module, self.device = module, device
        self.loads = 0
        self.load_s = 0.0  # total seconds spent copying the tower in
        self._to_host()

    def _to_host(self) -> None:
        for p in self.module.parameters():
            p.data = p.data.to("cpu").pin_memory()
        torch.cuda.empty_cache()

    @contextmanager
    def on_device(self):
        t0 = time.perf_counter()
        host = [p.data for p in self.module.parameters()]
        for p in self.module.parameters():
            p.data = p.data.to(self.device, non_blocking=True)
        torch.cuda.synchronize(self.device)
        self.loads += 1
        self.load_s += time.perf_counter() - t0
        try:
            yield
        finally:  # drop the device copies; the pinned host copies were never modified
            for p, h in zip(self.module.parameters(), host):
                p.data = h

    @property
    def bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.module.parameters())
