"""The engine loop and Python's garbage collector (engine/core.py).

The loop turns the collector off while it has work, and that switch is process-wide: a
server's event loop and client threads run without automatic collection too. Under constant
load the loop is never idle, so unless it collects the older generations itself, cyclic
garbage that survived one young collection (asyncio tasks, HTTP objects, exception
tracebacks, closed live sessions and their frames) is never freed: the issue-9 soak grew
by 245 MiB in 4 minutes that way. Checked: garbage in the oldest generation is collected
while one long request keeps the loop busy the whole time."""

from __future__ import annotations

import gc
import time
import weakref

import omnistream.engine.core as core
from omnistream import Engine, SamplingParams

FULL_COLLECT_S = 0.2  # the loop's clock for full collections, shortened for the test
WAIT_S = 10.0  # far more than FULL_COLLECT_S plus one step


class _Node:
    """A reference cycle only the cyclic collector frees (reference counting never does)."""

    def __init__(self) -> None:
        self.me = self


def _old_cycle() -> weakref.ref:
    """A cycle in the oldest generation (survived the young collections while referenced),
    now unreachable: only a full collection frees it."""
    node = _Node()
    gc.collect(1)  # survivors of generations 0 and 1 move to generation 2
    ref = weakref.ref(node)
    del node
    return ref


def _wait(pred, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_old_cyclic_garbage_is_collected_while_the_loop_stays_busy(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(core, "_FULL_COLLECT_S", FULL_COLLECT_S)
    eng = Engine.from_pretrained(tiny_model_dir, device="cpu", block_size=16, kv_cache_tokens=8192)
    try:
        spec = eng.request_for([{"role": "user", "content": "Count to a thousand."}],
                               SamplingParams(max_new_tokens=4000, ignore_eos=True))
        handle = eng.submit(spec)
        assert _wait(lambda: not gc.isenabled(), WAIT_S), "the loop never turned the collector off"
        ref = _old_cycle()
        collected = _wait(lambda: ref() is None, WAIT_S)
        busy = not handle.done  # the loop had work the whole time: no idle collection freed it
        handle.abort()
        handle.result()
        assert busy, "the request ended before the check: make it longer"
        assert collected, f"a cycle in generation 2 outlived {WAIT_S} s of constant load"
    finally:
        eng.close()
    assert gc.isenabled()  # a closed engine leaves the collector on
