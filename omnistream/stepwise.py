"""Computations written as generators that yield between their pieces, so that a caller can
spread one over several engine steps (a vision forward one block at a time:
engine/encode_ahead.py) or run it at once with `drain`.

    gen = tower.forward_steps(pixels, grids)
    next(gen)                 # the first block (and what precedes it)
    value = drain(gen)        # the rest; the generator's return value
"""

from __future__ import annotations

from typing import Generator, TypeVar

T = TypeVar("T")


def drain(gen: Generator[object, None, T]) -> T:
    """Runs a generator to its end -> its return value."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def run_steps(gen: Generator[object, None, T], steps: int) -> tuple[bool, T | None]:
    """Advances a generator by at most `steps` yields -> (finished, its return value or None)."""
    for _ in range(steps):
        try:
            next(gen)
        except StopIteration as stop:
            return True, stop.value
    return False, None
