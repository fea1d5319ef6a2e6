"""A request: one prompt (tokens + media) being prefilled and decoded by the engine.

Built from an `EngineRequest` (engine/protocol.py) in the submitting thread: everything derivable
from the prompt alone (M-RoPE positions, prefix-cache names of its full blocks, budget checks)
is computed there, never in the scheduling loop.
"""

from __future__ import annotations

import enum

import torch

from omnistream.engine.protocol import EngineRequest, OwnedKV, RequestMetrics, Retain, TokenLogprob
from omnistream.engine.sampling import SamplingParams
from omnistream.media.item import MediaItem


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    def __init__(self, request_id: str, spec: EngineRequest, positions: torch.Tensor, next_pos: int, stop_ids: set[int]) -> None:
        """positions: (3, prompt_len) from the model (or spec.kv's explicit ones)."""
        self.request_id = request_id
        self.prompt_len = len(spec.token_ids)
        self.token_ids: list[int] = list(spec.token_ids)  # prompt + generated
        self.media: list[tuple[int, MediaItem]] = spec.media  # (offset in prompt, item), sorted
        self.mm_embeds: list[torch.Tensor | None] = [None] * len(spec.media)  # (item.num_tokens, hidden)
        self.sampling: SamplingParams = spec.sampling
        self.stop_ids = set() if spec.sampling.ignore_eos else set(stop_ids) | set(spec.sampling.stop_token_ids)
        self.kv: OwnedKV | None = spec.kv
        self.retain: Retain | None = spec.retain
        if positions.shape[1] != self.prompt_len:
            raise ValueError("positions must cover the prompt")
        self.positions, self.next_pos = positions, next_pos
        self.want_logits = spec.return_logits
        self.top_logprobs = spec.logprobs
        self.logprobs: list[TokenLogprob] | None = [] if spec.logprobs is not None else None
        self.forced = spec.forced_output  # teacher forcing (scoring a given continuation)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.cache_salt = spec.cache_salt  # tenant: roots the prefix-cache names of its blocks
        self.block_hashes: list[bytes] = []  # prefix-cache names of its full blocks, in order
        self.num_named_blocks = 0  # blocks already offered to the prefix cache
        self.status = RequestStatus.WAITING
        self.finish_reason: str | None = None
        self.generator = torch.Generator().manual_seed(spec.sampling.seed) if spec.sampling.seed is not None else None
        self.metrics = RequestMetrics(prompt_tokens=self.prompt_len, media_tokens=sum(m.num_tokens for _, m in spec.media),
                                      media_decode_s=spec.media_decode_s, preprocess_s=spec.preprocess_s)
        if spec.arrival is not None:
            self.metrics.arrival = spec.arrival
        self.num_bypassed = 0  # times a later request was admitted before this one (admission policy)
        # with media encoded ahead (engine/encode_ahead.py): the prompt is scheduled up to this
        # token, the first media placeholder whose patch is not encoded yet; None: no limit
        self.media_ready_until: int | None = None
        self.error: BaseException | None = None
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
        if self.forced is not None and self.metrics.output_tokens < len(self.forced):
            token = self.forced[self.metrics.output_tokens]
        self.token_ids.append(token)
        self.metrics.output_tokens += 1
        if token in self.stop_ids:
            self.finish_reason = "stop"
        elif self.metrics.output_tokens >= self.sampling.max_new_tokens:
            self.finish_reason = "length"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
