"""The contract between the engine core and its clients (the Python API, sessions, the server).

A client builds an `EngineRequest` (token ids + media already decoded, preprocessed and hashed
in the client's thread), submits it and reads `OutputDelta`s and one final `RequestOutput` from
the handle it gets back (engine/core.py). Everything that must happen to the engine's state when
a request ends (keep a session's KV, hand an owned KV sequence back) is a directive carried by
the request and applied by the loop itself, atomically.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from omnistream.engine.sampling import SamplingParams
from omnistream.media.item import MediaItem


@dataclass(frozen=True)
class Retain:
    """After the request ends, keep the KV of its tokens (prompt + answer) for `owner` (a
    session id), at most `max_tokens` (None: all), replacing what `owner` kept before. Kept KV
    is idle: it may be evicted, least recently used first, when other requests need the space;
    the owner's next request then recomputes the missing part (exact: blocks are found by
    content name, see cache/prefix_hash.py)."""

    owner: str
    max_tokens: int | None = None


@dataclass(frozen=True)
class OwnedKV:
    """The request continues the KV sequence that `owner` owns (the live policy `fast`, which
    edits its KV in place) instead of an ordinary prompt: its first `computed` tokens are
    already in the owner's blocks; the rest is computed into them (the table grows as needed).
    Such KV is not what a fresh run of the token ids would give, so these requests never read
    or name prefix-cache blocks."""

    owner: str
    computed: int
    positions: torch.Tensor  # (3, len(token_ids)) explicit M-RoPE positions
    next_pos: int  # position of the first generated token
    keep: bool = True  # at the end the owner's sequence is the request's block table


@dataclass
class EngineRequest:
    token_ids: list[int]
    media: list[tuple[int, MediaItem]] = field(default_factory=list)  # (placeholder offset, item), sorted
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None  # None: the engine names it
    cache_salt: str | None = None  # tenant: roots the prefix-cache names, tenants never share KV
    known_hashes: list[bytes] | None = None  # prefix-cache names already computed for a prefix
    # positions already computed for the first tokens ((3, n), next position; a session's
    # history): the engine computes only the rest (models/position_prefix.py)
    known_positions: tuple[torch.Tensor, int] | None = None
    retain: Retain | None = None
    kv: OwnedKV | None = None
    return_logits: bool = False  # keep each sampled row's float logits (vocab,) on the host
    logprobs: int | None = None  # None: none; k: the sampled token's logprob + the top-k alternatives
    forced_output: list[int] | None = None  # scoring: these tokens are fed instead of samples (logits
    # and logprobs are the model's at each of them); the answer ends after them
    arrival: float | None = None  # perf_counter() when the user asked (TTFT counts from here)
    media_decode_s: float = 0.0  # client-side costs, reported in the metrics
    preprocess_s: float = 0.0


@dataclass
class RequestMetrics:
    """Per-request timings (seconds, perf_counter clock) and counts."""

    arrival: float = field(default_factory=time.perf_counter)
    media_decode_s: float = 0.0
    preprocess_s: float = 0.0
    vision_encode_s: float = 0.0
    prefill_s: float = 0.0  # wall time of the steps that advanced this request's prompt
    scheduled_at: float | None = None  # first admitted
    first_token_at: float | None = None
    finished_at: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served by the prefix cache (KV not recomputed)
    media_tokens: int = 0
    output_tokens: int = 0
    peak_memory_bytes: int = 0
    token_times: list[float] = field(default_factory=list, repr=False)  # when each token was produced

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrival

    @property
    def queue_s(self) -> float | None:
        return None if self.scheduled_at is None else self.scheduled_at - self.arrival

    @property
    def decode_tokens_per_s(self) -> float | None:
        if self.finished_at is None or self.first_token_at is None or self.output_tokens < 2:
            return None
        return (self.output_tokens - 1) / max(self.finished_at - self.first_token_at, 1e-9)

    @property
    def inter_token_s(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]

    def as_dict(self) -> dict:
        return {
            "media_decode_s": self.media_decode_s,
            "preprocess_s": self.preprocess_s,
            "vision_encode_s": self.vision_encode_s,
            "prefill_s": self.prefill_s,
            "queue_s": self.queue_s,
            "ttft_s": self.ttft_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "media_tokens": self.media_tokens,
            "output_tokens": self.output_tokens,
            "peak_memory_bytes": self.peak_memory_bytes,
        }


TokenLogprob = tuple[float, list[tuple[int, float]]]  # (logprob of the sampled token, top-k (id, logprob))


@dataclass
class OutputDelta:
    """What one request produced since its last delta."""

    request_id: str
    token_ids: list[int]
    text: str  # the new text (held back while it ends inside a multi-byte character)
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    """The end of one request: every generated token and its text, why it ended, its metrics
    (and logits / logprobs when asked). `handle.result()` returns it, or raises `error`."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    metrics: RequestMetrics
    logits: list[torch.Tensor] | None = None  # (vocab,) per generated token, when asked
    logprobs: list[TokenLogprob] | None = None
    error: BaseException | None = None  # set when finish_reason == "error"
    live: Any = None  # a live session's per-question metrics (sessions/live.py LiveMetrics)
