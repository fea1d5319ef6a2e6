"""How long a step's vision encoding took, measured without stopping the host.

Timing the encode with a device synchronisation before and after it kept the host from
launching the step's decoder forward until the vision tower had finished: the GPU then waited
for the host's launches (an eager prefill's ~1400 kernels) after every media step. CUDA events
time it on the device instead; the figure is read once the step's tokens are, when the events
have long completed. On the CPU the encode is synchronous and timed with the clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class VisionTiming:
    shares: list[tuple[Any, int]] = field(default_factory=list)  # (request, tokens encoded for it)
    seconds: float = 0.0  # known once resolved
    _start: Any = None  # torch.cuda.Event, or the perf_counter start on the CPU
    _end: Any = None
    _resolved: bool = False

    @classmethod
    def start(cls, device: torch.device) -> "VisionTiming":
        t = cls()
        if device.type == "cuda":
            t._start = torch.cuda.Event(enable_timing=True)
            t._start.record()
        else:
            t._start = time.perf_counter()
        return t

    def stop(self, shares: list[tuple[Any, int]]) -> None:
        """After the encode was launched: shares = tokens encoded per request (cache hits are
        not encoding). On the CPU the time is known now and charged at once."""
        self.shares = [(r, n) for r, n in shares if n]
        if isinstance(self._start, float):
            self.seconds = time.perf_counter() - self._start
            self._charge()
        else:
            self._end = torch.cuda.Event(enable_timing=True)
            self._end.record()

    def resolve(self) -> float:
        """The encode's seconds (waits for its end event: call it once the step is read);
        charges each request its share of them, once."""
        if not self._resolved and self._end is not None:
            self._end.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1000.0
            self._charge()
        return self.seconds

    def _charge(self) -> None:
        self._resolved = True
        total = sum(n for _, n in self.shares)
        if not total:
            self.seconds = 0.0  # only real encoding counts as vision time
            return
        for req, n in self.shares:
            req.metrics.vision_encode_s += self.seconds * n / total
