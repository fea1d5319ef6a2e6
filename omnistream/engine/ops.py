"""Named engine operations: what clients ask the engine loop to do besides running requests.

    core.run_op("retained_tokens", session_id)      # waits; returns the result or raises
    core.post_op("release_retained", session_id)     # does not wait (errors are logged)

Each operation is a small function `op(llm, *args)` run by the loop between steps, in the order
sent, over plain picklable arguments: so the same call works against the in-thread core
(engine/core.py) and against a core in its own process (engine/remote_core.py), where a lambda
could not travel. Sessions, live sessions, the Python API and the server name these; nothing
outside engine/ passes functions to the loop.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

from omnistream.cache.encoder_cache import EncoderCache
from omnistream.engine.llm_engine import LLMEngine

log = logging.getLogger(__name__)

OPS: dict[str, Callable[..., Any]] = {}


def op(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Registers fn under its name."""
    OPS[fn.__name__] = fn
    return fn


def resolve(name: str) -> Callable[..., Any]:
    """The operation called `name` (ValueError names the known ones)."""
    try:
        return OPS[name]
    except KeyError:
        raise ValueError(f"unknown engine operation {name!r}; known: {', '.join(sorted(OPS))}") from None


# ------------------------------------------------------------------------------ liveness
@op
def noop(llm: LLMEngine) -> None:
    """A round trip through the loop (health checks: alive and not stuck)."""


# ------------------------------------------------------------------------------ sessions' retained KV
@op
def retained_tokens(llm: LLMEngine, owner: str) -> int:
    return llm.blocks.retained_tokens(owner)


@op
def retained_blocks(llm: LLMEngine, owner: str) -> list[int]:
    return list(llm.blocks.retained.get(owner, []))


@op
def fork_retained(llm: LLMEngine, src: str, dst: str) -> None:
    """`dst` retains the blocks `src` retains now (a forked session shares its history's KV)."""
    llm.blocks.retain(dst, list(llm.blocks.retained.get(src, [])))


@op
def release_retained(llm: LLMEngine, owner: str) -> None:
    llm.blocks.release_retained(owner)


# ------------------------------------------------------------------------------ live KV (policy fast)
@op
def owned_blocks(llm: LLMEngine, owner: str) -> list[int]:
    return list(llm.blocks.owned_blocks(owner))


@op
def close_gap(llm: LLMEngine, owner: str, start: int, length: int, computed: int) -> None:
    """Removes tokens [start, start + length) of the owned sequence of `computed` tokens: later
    K/V moves left (keeping what it was computed with), the table shrinks."""
    llm.move_kv(owner, start + length, computed, -length)
    llm.blocks.trim_owned(owner, computed - length)


@op
def open_gap(llm: LLMEngine, owner: str, start: int, length: int, computed: int) -> None:
    """Makes room for `length` tokens at `start` of the owned sequence of `computed` tokens:
    the table grows (BudgetError when the pool is full), later K/V moves right."""
    llm.blocks.grow_owned(owner, computed + length)
    llm.move_kv(owner, start, computed, length)


@op
def release_owned(llm: LLMEngine, owner: str) -> None:
    llm.blocks.release_owned(owner)


# ------------------------------------------------------------------------------ encoder cache
@op
def ensure_encoder_cache(llm: LLMEngine, nbytes: int) -> bool:
    """Creates an encoder cache of `nbytes` if the engine has none (live sessions need one);
    True when it was created."""
    if llm.runner.encoder_cache is not None:
        return False
    log.info("live session: no encoder cache configured (--encoder-cache-bytes), creating %d MiB", nbytes >> 20)
    llm.runner.encoder_cache = EncoderCache(nbytes)
    return True


@op
def discard_encoder_entries(llm: LLMEngine, keys: list[str]) -> None:
    """Drops cached media embeddings (benchmarks make the next use encode again)."""
    if llm.runner.encoder_cache is not None:
        for k in keys:
            llm.runner.encoder_cache.discard(k)


# ------------------------------------------------------------------------------ state
@op
def stats(llm: LLMEngine) -> dict[str, Any]:
    """A consistent snapshot of the engine's state (Engine.stats adds the sessions)."""
    runner, enc = llm.runner, llm.runner.encoder_cache
    return {
        "prefix_cache": llm.blocks.stats.as_dict(),
        "encoder_cache": dataclasses.asdict(enc.stats) if enc is not None else None,
        "vision_tokens_encoded": runner.vision_tokens_encoded,
        "kv_blocks_free": llm.blocks.num_free,
        "kv_blocks_total": llm.blocks.num_blocks,
        "kv_blocks_retained": sum(len(b) for b in llm.blocks.retained.values()),
        "kv_blocks_owned": sum(len(b) for b in llm.blocks.owned.values()),
        "requests_running": len(llm.scheduler.running),
        "requests_waiting": len(llm.scheduler.waiting),
        "engine": llm.counters.as_dict(),
        "vision_offload": None if runner.vision_offload is None else {
            "loads": runner.vision_offload.loads, "load_s": runner.vision_offload.load_s,
            "bytes": runner.vision_offload.bytes},
    }
