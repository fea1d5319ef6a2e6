"""PyAV, imported on first use: decoding files needs it, frame lists and images do not (the
GPU machine has no PyAV, and its benchmarks feed generated frames)."""

from __future__ import annotations

import importlib


class _LazyModule:
    def __init__(self, name: str) -> None:
        self._name = name
        self._module = None

    def __getattr__(self, attr: str):
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


av = _LazyModule("av")
