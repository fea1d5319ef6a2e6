"""Scheduler and sampler units: token budget, chunking, admission by free blocks, refusal."""

from __future__ import annotations

import pytest
import torch

from omnistream.cache.block_manager import BlockManager
from omnistream.config import SchedulerConfig
from omnistream.engine.protocol import EngineRequest, OwnedKV
from omnistream.engine.request import Request
from omnistream.engine.sampling import SamplingParams, sample
from omnistream.engine.scheduler import Scheduler
from omnistream.errors import BudgetError


def make_request(n: int, max_new: int = 4, rid: str = "r", owner: str | None = None) -> Request:
    spec = EngineRequest(list(range(n)), sampling=SamplingParams(max_new_tokens=max_new),
                         kv=None if owner is None else OwnedKV(owner, 0, torch.arange(n).expand(3, -1), n))
    return Request(rid, spec, torch.arange(n).expand(3, -1), n, {151645})


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
        sched.check(make_request(20))


def test_no_chunking_refuses_long_prompt():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=8, enable_chunked_prefill=False), BlockManager(64, 4))
    with pytest.raises(BudgetError, match="chunked prefill is off"):
        sched.check(make_request(9))


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


def _run_to_end(sched: Scheduler, req: Request) -> None:
    while req.status.value != "finished":
        advance(sched, sched.schedule())


def test_large_waiting_request_is_bypassed_only_a_bounded_number_of_times():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=100), BlockManager(20, 4))
    running = make_request(16, max_new=40, rid="running")  # holds 5..14 blocks for 40 steps
    sched.add(running)
    advance(sched, sched.schedule())
    big = make_request(60, max_new=2, rid="big")  # 15 blocks: waits for `running` to end
    sched.add(big)
    admitted = []
    for i in range(Scheduler.MAX_BYPASS + 5):
        small = make_request(2, max_new=1, rid=f"small{i}")
        sched.add(small)
        out = sched.schedule()
        admitted += [c.request.request_id for c in out.chunks if c.request.request_id.startswith("small")]
        advance(sched, out)
    # smaller requests passed the big one, but only MAX_BYPASS of them: then the queue waits
    assert len(admitted) == Scheduler.MAX_BYPASS and big.num_bypassed == Scheduler.MAX_BYPASS
    assert big in sched.waiting and sched.waiting[0] is big
    _run_to_end(sched, running)
    out = sched.schedule()
    assert out.chunks[0].request is big  # admitted first once the pool drains


def test_idle_retained_kv_is_evicted_for_a_new_request():
    bm = BlockManager(8, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=100), bm)
    bm.retain("session", bm.allocate(6))  # a session keeps 6 of 8 blocks between turns
    bm.unpin(bm.retained["session"])  # (allocate's own reference; the retention keeps one)
    req = make_request(16, max_new=2, rid="new")
    sched.add(req)
    out = sched.schedule()
    assert [c.request for c in out.chunks] == [req] and "session" not in bm.retained
    assert bm.stats.retained_evictions == 1


def test_request_blocked_by_owned_kv_fails_instead_of_waiting_forever():
    bm = BlockManager(8, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=100), bm)
    bm.grow_owned("live", 24)  # a live session's own KV: 6 blocks, never evicted
    req = make_request(16, max_new=2, rid="new")
    sched.add(req)
    out = sched.schedule()
    assert not out.chunks and [r for r, _ in out.rejected] == [req]
    assert isinstance(out.rejected[0][1], BudgetError) and "live sessions" in str(out.rejected[0][1])
    assert not sched.has_work()


def test_prefill_is_capped_while_others_decode():
    cfg = dict(max_num_batched_tokens=100, max_step_tokens_while_decoding=21, prefill_cap_scope="per_step")
    sched = Scheduler(SchedulerConfig(**cfg), BlockManager(64, 4))
    a = make_request(6, max_new=20, rid="a")
    sched.add(a)
    out = sched.schedule()
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("a", 6)]  # nobody decodes: full budget
    advance(sched, out)
    b, c = make_request(30, rid="b"), make_request(5, rid="c")
    sched.add(b)
    sched.add(c)
    out = sched.schedule()  # a decodes: the step holds 21 tokens, b's and c's prompts share 20
    assert [(x.request.request_id, x.num_tokens) for x in out.chunks] == [("a", 1), ("b", 20)]
    advance(sched, out)
    out = sched.schedule()
    assert sum(x.num_tokens for x in out.chunks if x.request is not a) == 15  # b's last 10, c's 5
    many = Scheduler(SchedulerConfig(max_num_batched_tokens=100, max_step_tokens_while_decoding=4, prefill_cap_scope="per_step"), BlockManager(64, 4))
    for i in range(6):  # 6 decoders > the cap: prefill still gets MIN_PREFILL_TOKENS
        many.add(make_request(2, max_new=50, rid=f"d{i}"))
    advance(many, many.schedule())
    many.add(make_request(40, rid="p"))
    out = many.schedule()
    assert sum(x.num_tokens for x in out.chunks if x.request.request_id == "p") == 16


def test_prefill_cap_is_per_request_in_prefill_by_default():
    """Each request in prefill brings one cap: a burst of short prompts joins a decoding batch in
    one step; one long prompt still gets one cap per step."""
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=100, max_step_tokens_while_decoding=30), BlockManager(64, 4))
    a = make_request(6, max_new=20, rid="a")
    sched.add(a)
    advance(sched, sched.schedule())  # a's prompt: nobody decodes yet
    for i in range(4):
        sched.add(make_request(9, rid=f"q{i}"))
    out = sched.schedule()  # a decodes, 4 wait: 4 caps of 30 (one cap would leave q3 2 tokens)
    assert [(x.request.request_id, x.num_tokens) for x in out.chunks] == [("a", 1), ("q0", 9), ("q1", 9), ("q2", 9), ("q3", 9)]
    advance(sched, out)
    long = make_request(60, rid="long")
    sched.add(long)
    out = sched.schedule()  # 5 decode, one prompt in prefill: one cap of 30 minus 5 decodes
    assert sum(x.num_tokens for x in out.chunks if x.request is long) == 25
    advance(sched, out)
    out = sched.schedule()  # still one request in prefill (running mid-prompt): one cap
    assert sum(x.num_tokens for x in out.chunks if x.request is long) == 25


def test_prefill_caps_count_only_requests_with_a_free_sequence_slot():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=100, max_step_tokens_while_decoding=10, max_num_seqs=3), BlockManager(64, 4))
    sched.add(make_request(3, max_new=20, rid="a"))
    advance(sched, sched.schedule())
    for i in range(5):  # five wait, two sequence slots are free: two caps, minus a's decode row
        sched.add(make_request(40, rid=f"w{i}"))
    out = sched.schedule()
    assert [(x.request.request_id, x.num_tokens) for x in out.chunks] == [("a", 1), ("w0", 19)]


def test_prefill_caps_add_up_to_at_most_the_ceiling_while_decoding():
    cfg = SchedulerConfig(max_num_batched_tokens=100, max_step_tokens_while_decoding=10, max_prefill_tokens_while_decoding=25)
    sched = Scheduler(cfg, BlockManager(64, 4))
    sched.add(make_request(3, max_new=20, rid="a"))
    advance(sched, sched.schedule())
    for i in range(6):  # six caps of 10 would be 60: the ceiling, 25, minus a's decode row
        sched.add(make_request(8, rid=f"w{i}"))
    out = sched.schedule()
    assert [(x.request.request_id, x.num_tokens) for x in out.chunks] == [("a", 1), ("w0", 8), ("w1", 8), ("w2", 8)]


def test_each_request_limits_every_chunk_to_one_cap():
    """per_request pools the caps and serves in order: a long prompt ahead of short ones takes
    the whole pool (found by a review); each_request gives it one cap and the short ones theirs."""
    def step(scope):
        sched = Scheduler(SchedulerConfig(max_num_batched_tokens=200, max_step_tokens_while_decoding=30, prefill_cap_scope=scope),
                          BlockManager(256, 4))
        sched.add(make_request(3, max_new=50, rid="dec"))
        advance(sched, sched.schedule())
        sched.add(make_request(400, rid="long"))
        for i in range(3):
            sched.add(make_request(8, rid=f"q{i}"))
        return [(x.request.request_id, x.num_tokens) for x in sched.schedule().chunks]

    assert step("per_request") == [("dec", 1), ("long", 119)]  # four caps of 30, minus the decode row
    assert step("each_request") == [("dec", 1), ("long", 30), ("q0", 8), ("q1", 8), ("q2", 8)]


def test_a_long_prompt_chunk_shrinks_with_its_context_while_others_decode():
    """prefill_context_tokens_while_decoding: past that context a chunk gets the cap in
    proportion (its attention, which reads the whole context per query, stays bounded)."""
    cfg = SchedulerConfig(max_num_batched_tokens=1000, max_step_tokens_while_decoding=64, prefill_context_tokens_while_decoding=128)
    sched = Scheduler(cfg, BlockManager(1024, 4))
    long = make_request(800, rid="long")
    sched.add(long)
    out = sched.schedule()  # nobody decodes: the whole budget, no context limit
    assert [(x.request.request_id, x.num_tokens) for x in out.chunks] == [("long", 800)]
    sched = Scheduler(cfg, BlockManager(1024, 4))
    sched.add(make_request(3, max_new=200, rid="dec"))
    advance(sched, sched.schedule())
    long = make_request(800, rid="long")
    sched.add(long)
    sizes = []
    for _ in range(40):
        out = sched.schedule()
        sizes.append(sum(x.num_tokens for x in out.chunks if x.request is long))
        advance(sched, out)
        if long.num_computed_tokens >= long.prompt_len:
            break
    # one cap (64, less the decode row) up to 128 tokens of context, then 64 * 128 / context
    assert sizes[:4] == [63, 63, 63, 64 * 128 // 189]  # 43 at context 189
    for i in range(3, len(sizes) - 1):
        assert sizes[i] == max(16, 64 * 128 // sum(sizes[:i])), (i, sizes)
    assert long.num_computed_tokens == 800 and sizes[-2] == 16  # the floor at long contexts
    off = Scheduler(SchedulerConfig(max_num_batched_tokens=1000, max_step_tokens_while_decoding=64), BlockManager(1024, 4))
    off.add(make_request(3, max_new=200, rid="dec"))
    advance(off, off.schedule())
    other = make_request(800, rid="long")
    off.add(other)
    for _ in range(5):
        out = off.schedule()
        advance(off, out)
    assert other.num_computed_tokens == 5 * 63  # unset: one cap per step whatever the context
