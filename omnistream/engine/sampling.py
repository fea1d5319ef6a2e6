"""Sampling parameters and the sampler (greedy, temperature, top-k, top-p, per-request seed)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnistream.errors import UserInputError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 128
    seed: int | None = None  # per-request generator: same seed, same tokens
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's eos / im_end
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.max_new_tokens < 1:
            raise UserInputError(f"invalid sampling parameters: {self}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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
