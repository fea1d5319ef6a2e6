"""Scheduler and sampler units: token budget, chunking, admission by free blocks, refusal."""

from __future__ import annotations

import pytest
import torch

from omnistream.cache.block_manager import BlockManager
from omnistream.config import SchedulerConfig
from omnistream.engine.request import Request
from omnistream.engine.sampling import SamplingParams, sample
from omnistream.engine.scheduler import Scheduler
from omnistream.errors import BudgetError


def make_request(n: int, max_new: int = 4, rid: str = "r") -> Request:
    return Request(rid, list(range(n)), [], SamplingParams(max_new_tokens=max_new), 2, {151645})


def advance(sched: Scheduler, out) -> None:
    for c in out.chunks:
        c.request.num_computed_tokens += c.num_tokens
        if c.samples:
            c.request.append_token(7)
            if c.request.finished:
                sched.finish(c.request)


def test_budget_chunks_prefill_and_mixes_decodes():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=10), BlockManager(64, 4))
    a, b = make_request(6, rid="a"), make_request(25, rid="b")
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("a", 6), ("b", 4)]
    advance(sched, out)
    out = sched.schedule()  # a decodes (1 token) while b continues its prompt (9 tokens)
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 9)]
    assert out.num_tokens <= 10


def test_admission_waits_for_free_blocks():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=100), BlockManager(6, 4))
    a, b = make_request(16, max_new=2, rid="a"), make_request(16, max_new=2, rid="b")
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert [c.request.request_id for c in out.chunks] == ["a"]  # b queued: 4 + 4 blocks > 6
    while a.status.value != "finished":
        advance(sched, out)
        out = sched.schedule()
    assert b in sched.running or any(c.request is b for c in out.chunks)


def test_refuses_request_larger_than_pool():
    sched = Scheduler(SchedulerConfig(), BlockManager(4, 4))
    with pytest.raises(BudgetError, match="KV pool"):
        sched.add(make_request(20))


def test_no_chunking_refuses_long_prompt():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=8, enable_chunked_prefill=False), BlockManager(64, 4))
    with pytest.raises(BudgetError, match="chunked prefill is off"):
        sched.add(make_request(9))


def test_sampler_seed_and_topk():
    logits = torch.randn(3, 50)
    greedy = sample(logits, [SamplingParams()] * 3, [None] * 3)
    assert greedy == logits.argmax(-1).tolist()
    assert sample(logits, [SamplingParams(temperature=1.0, top_k=1)] * 3, [None] * 3) == greedy
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=3)
    draws = [sample(logits[:1].clone(), [p], [torch.Generator().manual_seed(3)]) for _ in range(2)]
    assert draws[0] == draws[1]
    with pytest.raises(Exception):
        SamplingParams(top_p=0.0)
