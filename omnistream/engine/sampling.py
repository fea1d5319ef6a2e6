"""Sampling parameters and the sampler (greedy, temperature, top-k, top-p, per-request seed)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from omnistream.errors import UserInputError


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens: greedy by default (temperature 0), else temperature /
    top-k / top-p sampling from a per-request generator (`seed`: the same seed, the same
    tokens), for at most `max_new_tokens`. Validated when built: a bad field raises
    UserInputError naming it."""

    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 128
    seed: int | None = None  # per-request generator: same seed, same tokens
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's eos / im_end
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop_token_ids, list):  # a JSON / CLI list: kept hashable, as declared
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        problems = _problems(self)
        if problems:  # every bad field at once, by name, so one correction fixes the request
            raise UserInputError("invalid sampling parameters: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _problems(p: SamplingParams) -> list[str]:
    """One 'field must ..., got value' line per bad field (type checks first: a string
    compared with a number would raise a bare TypeError instead)."""
    out = []
    if not (_is_number(p.temperature) and p.temperature >= 0):
        out.append(f"temperature must be a number >= 0 (0: greedy), got {p.temperature!r}")
    if not (_is_number(p.top_p) and 0 < p.top_p <= 1):
        out.append(f"top_p must be a number in (0, 1], got {p.top_p!r}")
    if not (_is_int(p.top_k) and p.top_k >= 0):
        out.append(f"top_k must be an integer >= 0 (0: off), got {p.top_k!r}")
    if not (_is_int(p.max_new_tokens) and p.max_new_tokens >= 1):
        out.append(f"max_new_tokens must be an integer >= 1, got {p.max_new_tokens!r}")
    if p.seed is not None and not _is_int(p.seed):
        out.append(f"seed must be an integer or None, got {p.seed!r}")
    ids = p.stop_token_ids
    if not (isinstance(ids, tuple) and all(_is_int(t) and t >= 0 for t in ids)):
        out.append(f"stop_token_ids must be a sequence of token ids (integers >= 0), got {ids!r}")
    if not isinstance(p.ignore_eos, bool):
        out.append(f"ignore_eos must be True or False, got {p.ignore_eos!r}")
    return out


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits: (B, V) -> one token per row. Greedy rows share one argmax."""
    out = logits.argmax(dim=-1)
    for i, p in enumerate(params):
        if not p.greedy:
            out[i] = _sample_row(logits[i].float(), p, generators[i])
    return out.tolist()


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    logits = logits / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = sorted_p.cumsum(0) - sorted_p >= p.top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter_(0, idx, sorted_p)
    if gen is not None and gen.device != probs.device:
        probs = probs.to(gen.device)
    return torch.multinomial(probs, 1, generator=gen).squeeze(0).to(logits.device)
