"""Progress bars for the command line's long work (loading a model, decoding media, a prefill,
an answer), through tqdm.

A bar appears only on a terminal and only once its work has taken `delay_s` (1 s): quick work,
pipes and tests see nothing. It is drawn on stderr and removed when its work ends, so stdout
holds only the answer. Work of unknown length (loading a model, a prefill) shows its elapsed
time, refreshed by a ticker thread because nothing else would redraw it.
"""

from __future__ import annotations

import sys
import threading
from typing import TextIO

DELAY_S = 1.0  # work shorter than this shows no bar
TICK_S = 0.25


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


class Progress:
    """One bar: `total` known (tokens of an answer) or not (None: a spinner with elapsed time)."""

    def __init__(self, label: str, total: int | None = None, unit: str = "it", delay_s: float = DELAY_S,
                 stream: TextIO | None = None) -> None:
        stream = stream or sys.stderr
        self._bar = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the ticker never redraws a closed bar
        if not is_terminal(stream):
            return
        from tqdm import tqdm

        fmt = None if total else "{desc}: {elapsed}"
        self._bar = tqdm(total=total, desc=label, unit=unit, delay=delay_s, file=stream, leave=False,
                         dynamic_ncols=True, bar_format=fmt)
        self._shown_after = self._bar.start_t + delay_s
        threading.Thread(target=self._tick, name="progress", daemon=True).start()

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            with self._lock:
                if self._bar is not None and self._bar._time() >= self._shown_after:
                    self._bar.refresh()

    def update(self, n: int = 1) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.update(n)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            bar, self._bar = self._bar, None
            if bar is not None:
                bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
