"""A request: one prompt (tokens + media) being prefilled and decoded by the engine.

Everything derivable from the prompt alone (M-RoPE positions, media offsets) is computed once
here, at admission, never in the scheduling loop.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from omnistream.engine.sampling import SamplingParams
from omnistream.media.item import MediaItem
from omnistream.models.mrope import mrope_positions


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    """Per-request timings (seconds) and counts; filled by the engine and the API."""

    arrival: float = field(default_factory=time.perf_counter)
    media_decode_s: float = 0.0
    preprocess_s: float = 0.0
    vision_encode_s: float = 0.0
    prefill_s: float = 0.0  # wall time of the steps that advanced this request's prompt
    first_token_at: float | None = None
    finished_at: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served by the prefix cache (KV not recomputed)
    media_tokens: int = 0
    output_tokens: int = 0
    peak_memory_bytes: int = 0

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrival

    @property
    def decode_tokens_per_s(self) -> float | None:
        if self.finished_at is None or self.first_token_at is None or self.output_tokens < 2:
            return None
        return (self.output_tokens - 1) / max(self.finished_at - self.first_token_at, 1e-9)

    def as_dict(self) -> dict:
        return {
            "media_decode_s": self.media_decode_s,
            "preprocess_s": self.preprocess_s,
            "vision_encode_s": self.vision_encode_s,
            "prefill_s": self.prefill_s,
            "ttft_s": self.ttft_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "media_tokens": self.media_tokens,
            "output_tokens": self.output_tokens,
            "peak_memory_bytes": self.peak_memory_bytes,
        }


@dataclass
class KVHandle:
    """A request that continues a KV sequence owned by someone else (a live session under
    policy `fast`, which edits its KV in place) instead of an ordinary prompt.

    Its first `computed` tokens are already in `blocks` (the owner keeps references on them);
    the request computes the rest into the same blocks. Such KV is not what a fresh run of the
    token ids would give, so these requests never read or name prefix-cache blocks."""

    blocks: list[int]  # block table covering at least `computed` tokens (owner holds refs)
    computed: int  # tokens already in the blocks
    positions: torch.Tensor | None = None  # (3, prompt_len) explicit M-RoPE positions
    next_pos: int = 0  # position of the first generated token (with explicit positions)
    keep_blocks: bool = False  # at the end, hand the block table's references to the owner
    kept: list[int] | None = None  # set when the request ends (keep_blocks): its block table


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        media: list[tuple[int, MediaItem]],
        sampling: SamplingParams,
        tokens_per_second: float,
        stop_ids: set[int],
        cache_salt: str | None = None,
        kv: "KVHandle | None" = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_len = len(prompt_ids)
        self.token_ids: list[int] = list(prompt_ids)  # prompt + generated
        self.media = media  # (offset in prompt, item), sorted
        self.mm_embeds: list[torch.Tensor | None] = [None] * len(media)  # (item.num_tokens, hidden)
        self.sampling = sampling
        self.stop_ids = set() if sampling.ignore_eos else set(stop_ids) | set(sampling.stop_token_ids)
        self.kv = kv
        if kv is not None and kv.positions is not None:
            self.positions, self.next_pos = kv.positions, kv.next_pos
            assert self.positions.shape[1] == self.prompt_len, "explicit positions must cover the prompt"
        else:
            self.positions, self.next_pos = mrope_positions(self.prompt_len, media, tokens_per_second)
        self.kept_blocks: list[int] | None = None  # the block table, when kv.keep_blocks
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.cache_salt = cache_salt  # tenant: roots the prefix-cache names of its blocks
        self.block_hashes: list[bytes] = []  # prefix-cache names of its full blocks, in order
        self.num_named_blocks = 0  # blocks already offered to the prefix cache
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None
        self.generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        self.metrics = RequestMetrics(prompt_tokens=self.prompt_len, media_tokens=sum(m.num_tokens for _, m in media))
        self.logits: list[torch.Tensor] | None = None  # sampled rows, kept only when asked (tests)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    def positions_for(self, start: int, end: int) -> torch.Tensor:
        """(3, end - start) positions of tokens [start, end). Generated tokens continue
        from the prompt's next position on all three rows."""
        p = self.prompt_len
        parts = []
        if start < p:
            parts.append(self.positions[:, start : min(end, p)])
        if end > p:
            lo = max(start, p)
            parts.append(torch.arange(self.next_pos + lo - p, self.next_pos + end - p).expand(3, -1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def append_token(self, token: int) -> None:
        self.token_ids.append(token)
        self.metrics.output_tokens += 1
        if token in self.stop_ids:
            self.finish_reason = "stop"
        elif self.metrics.output_tokens >= self.sampling.max_new_tokens:
            self.finish_reason = "length"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
