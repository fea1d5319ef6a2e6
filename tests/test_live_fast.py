"""Live KV policy `fast`: the session's KV edited in place (live_kv.py).

What is checked: without edits it is `exact`; an edit leaves every other token's K/V and
position bit for bit; a patch computed into place has the K/V a standard prefill gives it; after
evictions answers still come and differ from `exact` (the approximation is real, and measured);
memory stays bounded and returns to the pool."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnistream.engine.protocol import EngineRequest, OwnedKV
from omnistream.engine.sampling import SamplingParams
from omnistream.errors import ConfigError
from omnistream.media.frame_memory import FrameMemoryConfig
from tests.reference import assert_close_logits
from tests.test_live import SIZE, _engine, _feed, scene_frames

GREEDY = SamplingParams(max_new_tokens=4, ignore_eos=True)
BIG = FrameMemoryConfig(star_capacity=40, stream_capacity=40, dedupe_threshold=0.0)


def _kv_rows(eng, blocks: list[int], start: int, end: int) -> torch.Tensor:
    """(layers, 2, end - start, KVH, D) K/V of tokens [start, end) of a block table."""
    bs = eng.llm.blocks.block_size
    idx = torch.arange(start, end)
    slots = torch.tensor(blocks)[idx // bs] * bs + idx % bs
    pool = eng.llm.runner.kv_pool
    return pool.view(pool.shape[0], 2, -1, *pool.shape[-2:])[:, :, slots].clone()


def test_fast_without_edits_equals_exact(tiny_model_dir):
    frames = scene_frames(3, 4, seed=11)
    answers = {}
    for policy in ("exact", "fast"):
        eng = _engine(tiny_model_dir)
        live = eng.live_session(system="You watch.", max_pixels=SIZE, policy=policy, prefill_on_arrival=False)
        _feed(live, frames)
        answers[policy] = [live.ask(q, GREEDY, return_logits=True) for q in ("What is it?", "And then?")]
        assert answers[policy][1].live.policy == policy
        live.close()
        assert eng.llm.blocks.num_free == eng.llm.blocks.num_blocks
    for a, b in zip(answers["exact"], answers["fast"]):
        assert a.token_ids == b.token_ids
        assert_close_logits(b.logits, torch.stack(a.logits))


def test_fast_edits_keep_other_kv_and_compute_new_patches_exactly(tiny_model_dir):
    eng = _engine(tiny_model_dir)
    live = eng.live_session(max_pixels=SIZE, policy="fast", memory=BIG, prefill_on_arrival=False)
    frames = scene_frames(4, 4, seed=12)
    _feed(live, frames[:8])  # 4 patches, built at the first question
    live.ask("First?", GREEDY)
    kv = live.kv
    assert len(kv.spans) == 4
    before = {pid: (_kv_rows(eng, kv.blocks, a, a + n), kv.pos[:, a : a + n].clone()) for pid, (a, n) in kv.spans.items()}
    prefix_rows = _kv_rows(eng, kv.blocks, 0, min(kv.spans.values())[0])
    history_rows = _kv_rows(eng, kv.blocks, kv.video_end, kv.computed)

    # one more patch, no eviction: it is computed into place, everything else only moves
    _feed(live, frames[8:10], t0=4.0)
    live._prefill_prefix()
    assert len(kv.spans) == 5
    for pid, (rows, pos) in before.items():
        a, n = kv.spans[pid]
        assert torch.equal(_kv_rows(eng, kv.blocks, a, a + n), rows) and torch.equal(kv.pos[:, a : a + n], pos)
    assert torch.equal(_kv_rows(eng, kv.blocks, 0, len(prefix_rows[0, 0])), prefix_rows)
    assert torch.equal(_kv_rows(eng, kv.blocks, kv.video_end, kv.computed), history_rows)
    # the new patch's K/V = a standard prefill of the same tokens (prefix + 5 patches), which
    # is also what policy exact computes for them
    new = max(kv.spans)
    a, n = kv.spans[new]
    media = [(s, live._patch_item(live.patches[pid])) for pid, (s, _) in kv.spans.items()]
    ref = OwnedKV("reference", computed=0, positions=kv.pos[:, : a + n], next_pos=0)
    eng.run([EngineRequest(kv.ids[: a + n], media, SamplingParams(max_new_tokens=1, ignore_eos=True), kv=ref)])
    ref_blocks = eng.core.call(lambda llm: list(llm.blocks.owned_blocks("reference")))
    torch.testing.assert_close(_kv_rows(eng, kv.blocks, a, a + n), _kv_rows(eng, ref_blocks, a, a + n), rtol=1e-5, atol=1e-5)
    eng.core.call(lambda llm: llm.blocks.release_owned("reference"))
    # positions: temporal row from the real timestamps against the block's origin
    assert int(kv.pos[0, a]) == kv.video_start + int((4.0 - 0.0) * eng.model.cfg.vision.tokens_per_second)

    # evict the first patch by hand: later tokens keep their K/V, shifted left
    first = min(kv.spans)
    keep = {pid: _kv_rows(eng, kv.blocks, s, s + n) for pid, (s, n) in kv.spans.items() if pid != first}
    hist = _kv_rows(eng, kv.blocks, kv.video_end, kv.computed)
    kv.remove(first)
    for pid, rows in keep.items():
        s, n = kv.spans[pid]
        assert torch.equal(_kv_rows(eng, kv.blocks, s, s + n), rows)
    assert torch.equal(_kv_rows(eng, kv.blocks, kv.video_end, kv.computed), hist)
    assert len(kv.pos[0]) == len(kv.ids)
    live.close()
    assert eng.llm.blocks.num_free == eng.llm.blocks.num_blocks


def test_fast_after_evictions_answers_and_diverges_from_exact(tiny_model_dir):
    mem = FrameMemoryConfig(star_capacity=4, stream_capacity=4)
    frames = scene_frames(4, 6, seed=13)
    res = {}
    for policy in ("exact", "fast"):
        eng = _engine(tiny_model_dir)
        live = eng.live_session(max_pixels=SIZE, memory=mem, policy=policy)
        _feed(live, frames[:8])
        live.ask("Start?", GREEDY)
        _feed(live, frames[8:], t0=4.0)  # evictions from Stream and Star
        res[policy] = live.ask("Now?", GREEDY, return_logits=True)
        assert res[policy].live.visual_tokens == 4 * len(live.patches)
        live.close()
    a, b = res["exact"].logits[0], res["fast"].logits[0]
    assert a.shape == b.shape and torch.isfinite(b).all()
    assert not torch.allclose(a, b, rtol=1e-4, atol=1e-4), "fast recomputed everything: no KV was kept in place"


def test_fast_long_stream_stays_bounded(tiny_model_dir):
    eng = _engine(tiny_model_dir, kv_cache_tokens=1024)
    live = eng.live_session(max_pixels=SIZE, policy="fast", memory=FrameMemoryConfig(star_capacity=4, stream_capacity=4))
    rng = np.random.default_rng(7)
    sizes = []
    for minute in range(20):
        base = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        frames = [np.roll(base, i, axis=0) for i in range(60)]
        live.add_frames(frames, [minute * 30 + i / 2 for i in range(60)])
        if minute % 5 == 4:
            live.ask("What now?", SamplingParams(max_new_tokens=2, ignore_eos=True))
            kv = live.kv
            assert kv.visual_tokens == 4 * len(live.patches) <= 4 * 4
            assert len(kv.blocks) <= eng.llm.blocks.blocks_for(len(kv.ids))  # evicted patches' blocks went back
            sizes.append(kv.video_end)
    assert max(sizes) - min(sizes) <= 4 * 4  # the video part stays bounded; only the history grows
    live.close()
    assert eng.llm.blocks.num_free == eng.llm.blocks.num_blocks


def test_unknown_policy(tiny_model_dir):
    with pytest.raises(ConfigError):
        _engine(tiny_model_dir).live_session(max_pixels=SIZE, policy="approximate")


def test_fast_kv_pool_exhausted_is_a_clear_error_and_recovers(tiny_model_dir):
    from omnistream.errors import BudgetError

    eng = _engine(tiny_model_dir, kv_cache_tokens=4096)
    other = eng.session()
    live = eng.live_session(max_pixels=SIZE, policy="fast", memory=BIG, prefill_on_arrival=False)
    frames = scene_frames(3, 4, seed=14)
    _feed(live, frames[:6])
    live.ask("First?", GREEDY)
    bm = eng.llm.blocks
    hog = eng.core.call(lambda llm: llm.blocks.allocate(llm.blocks.num_free))  # someone else holds every free block
    _feed(live, frames[6:], t0=3.0)
    with pytest.raises(BudgetError):
        live.ask("Now?", GREEDY)
    assert not live.kv.built and not live.kv.blocks  # its KV went back, nothing half-edited
    eng.core.call(lambda llm: llm.blocks.unpin(hog))
    res = live.ask("Again?", GREEDY)  # rebuilt from the retained frames
    assert res.token_ids and live.kv.visual_tokens == 4 * len(live.patches)
    live.close()
    other.close()
    assert bm.num_free == bm.num_blocks


def test_fast_question_is_charged_with_the_frames_it_waited_for(tiny_model_dir):
    eng = _engine(tiny_model_dir)
    live = eng.live_session(max_pixels=SIZE, policy="fast")
    frames = scene_frames(2, 6, seed=15)
    _feed(live, frames[:8])
    live.ask("First?", GREEDY)
    quiet = live.ask("Again?", GREEDY)
    assert quiet.live.frames_encoded == 0 and quiet.live.encoding_latency == 0.0
    live.add_frames(frames[8:10], [10.0, 10.5])  # asked at once: the question computes them
    res = live.ask("Now?", GREEDY)
    assert res.live.frames_encoded == 2 and res.live.encoding_latency > 0
    live.close()
