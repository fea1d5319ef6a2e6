"""Per-request outputs of the model runner: return_logits (req.want_logits) keeps the sampled
rows' float logits on the host; logprobs=k (req.top_logprobs) gives per token the sampled
token's logprob and the top-k alternatives, from the logits before temperature; the runner-wide
keep_logits still forces logits for every request."""

from __future__ import annotations

import pytest
import torch

from omnistream.entrypoints.api import Engine
from omnistream.engine.sampling import SamplingParams

QUESTIONS = ["Name a colour.", "Count to three.", "Say hello.", "What is two plus two?"]


def _conv(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.from_pretrained(tiny_model_dir, device="cpu", kv_cache_tokens=4096, block_size=16)


def _run(engine, asks: list[tuple[bool, int | None]], sampling: SamplingParams) -> list:
    """One batch: question i with (return_logits, logprobs) = asks[i]."""
    return engine.run([engine.request_for(_conv(q), sampling, return_logits=rl, logprobs=lp)
                       for q, (rl, lp) in zip(QUESTIONS, asks)])


def test_logits_and_logprobs_only_for_the_requests_that_ask(engine):
    greedy = SamplingParams(max_new_tokens=5, ignore_eos=True)
    a, b, c, d = _run(engine, [(True, 3), (False, 0), (True, None), (False, None)], greedy)
    assert len(a.logits) == len(c.logits) == 5 and not b.logits and not d.logits
    assert all(row.dtype == torch.float32 and row.device.type == "cpu" and row.dim() == 1 for row in a.logits)
    assert not c.logprobs and not d.logprobs
    assert len(a.logprobs) == len(b.logprobs) == 5
    for token, row, (lp, top) in zip(a.token_ids, a.logits, a.logprobs):
        ref = torch.log_softmax(row, dim=-1)
        assert lp == pytest.approx(ref[token].item(), abs=1e-5)
        assert [t for t, _ in top] == ref.topk(3).indices.tolist()
        assert [x for _, x in top] == sorted((x for _, x in top), reverse=True)
        assert top[0][0] == token and top[0][1] == pytest.approx(lp)  # greedy: the best one
    assert all(top == [] and lp <= 0 for lp, top in b.logprobs)


def test_logprobs_are_taken_before_temperature(engine):
    hot = SamplingParams(max_new_tokens=4, ignore_eos=True, temperature=1.7, top_p=0.9, seed=3)
    [res] = _run(engine, [(True, 2)], hot)
    for token, row, (lp, top) in zip(res.token_ids, res.logits, res.logprobs):
        ref = torch.log_softmax(row, dim=-1)  # the raw logits, not logits / temperature
        assert lp == pytest.approx(ref[token].item(), abs=1e-5)
        assert [t for t, _ in top] == ref.topk(2).indices.tolist()


def test_runner_keep_logits_overrides(engine):
    runner = engine.llm.runner
    runner.keep_logits = True
    try:
        results = _run(engine, [(False, None), (False, None)], SamplingParams(max_new_tokens=3, ignore_eos=True))
    finally:
        runner.keep_logits = False
    assert all(len(r.logits) == 3 for r in results)
