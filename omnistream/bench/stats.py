"""Percentiles, means and ratios over lists that may hold None (a request without the figure)."""

from __future__ import annotations

import numpy as np


def pct(xs, q: float) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if xs else None


def mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None
