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
    cuda: bool = False
    # (start, end) of each piece: CUDA events, or perf_counter values on the CPU; an encode
    # spread over several steps (engine/encode_ahead.py, sliced) has one piece per step, so the
    # steps between its pieces do not count
    _pieces: list[list[Any]] = field(default_factory=list)
    _resolved: bool = False

    @classmethod
    def start(cls, device: torch.device) -> "VisionTiming":
        t = cls(cuda=device.type == "cuda")
        t.resume()
        return t

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def resume(self) -> None:
        """Starts a piece (start() starts the first)."""
        self._pieces.append([self._mark(), None])

    def pause(self) -> None:
        """Ends the current piece: the encode goes on in a later step (resume)."""
        self._pieces[-1][1] = self._mark()

    def stop(self, shares: list[tuple[Any, int]]) -> None:
        """After the encode was launched: shares = tokens encoded per request (cache hits are
        not encoding). On the CPU the time is known now and charged at once."""
        self.shares = [(r, n) for r, n in shares if n]
        if self._pieces[-1][1] is None:
            self.pause()
        if not self.cuda:
            self.seconds = sum(b - a for a, b in self._pieces)
            self._charge()

    def resolve(self) -> float:
        """The encode's seconds (waits for its last event: call it once the step is read);
        charges each request its share of them, once."""
        if not self._resolved and self.cuda and self._pieces and self._pieces[-1][1] is not None:
            self._pieces[-1][1].synchronize()
            self.seconds = sum(a.elapsed_time(b) for a, b in self._pieces) / 1000.0
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
