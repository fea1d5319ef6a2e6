"""Media hashing (once per item, at ingestion) and the encoder cache: LRU / references / CPU tier
units, and end-to-end exactness of the engine with the cache on (full hits, partial hits,
different videos, evictions) against the cache-off engine and transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnistream.entrypoints.api import Engine
from omnistream.cache.encoder_cache import EncoderCache, VisionPlan
from omnistream.engine.protocol import EngineRequest
from omnistream.engine.sampling import SamplingParams
from omnistream.media import hashing
from omnistream.media.processor import MediaProcessor
from omnistream.models.prompt import build_prompt
from tests.reference import assert_close_logits, reference_logits

GREEDY = SamplingParams(max_new_tokens=4, ignore_eos=True)
TPP = 20  # tokens per temporal patch of the test videos (84x112 frames resized to 112x140)
ENTRY = TPP * 64 * 4  # bytes of one tiny-model entry: TPP tokens x hidden 64 x float32


def _t(n_bytes: int, fill: float = 0.0) -> torch.Tensor:
    return torch.full((n_bytes // 4,), fill, dtype=torch.float32)


# ---------------------------------------------------------------- cache units


def test_lru_evicts_oldest_unreferenced():
    c = EncoderCache(3 * 400)
    for k in "abc":
        assert c.put(k, _t(400))
    assert c.get("a") is not None  # a is now the most recent
    assert c.put("d", _t(400))  # evicts b, the least recently used
    assert c.tier("b") is None and all(c.tier(k) == "gpu" for k in "acd")
    s = c.stats
    assert (s.entries, s.bytes, s.evictions, s.hits, s.misses) == (3, 1200, 1, 1, 0)
    assert c.get("b") is None and c.stats.misses == 1
    assert c.stats.hit_rate == 0.5


def test_references_pin_entries():
    c = EncoderCache(2 * 400)
    c.acquire(["a", "b"])  # acquired before insertion, as the runner does
    assert c.put("a", _t(400)) and c.put("b", _t(400))
    assert not c.put("c", _t(400))  # full of referenced entries: nothing inserted, nothing evicted
    assert c.tier("c") is None and c.stats.evictions == 0 and c.stats.rejected == 1
    c.release(["a"])
    assert c.put("c", _t(400))  # a is the only evictable entry
    assert c.tier("a") is None and c.tier("b") == "gpu" and c.tier("c") == "gpu"
    c.acquire(["b"])
    c.release(["b"])
    assert c.refcount("b") == 1  # counted: one reference left
    c.release(["b"])
    assert c.refcount("b") == 0
    with pytest.raises(ValueError):
        c.release(["b"])


def test_oversized_entries_are_not_cached():
    c = EncoderCache(1000, cpu_capacity_bytes=500)
    assert c.put("small", _t(400))
    assert not c.put("big", _t(1200))
    assert c.tier("big") is None and c.tier("small") == "gpu" and c.stats.rejected == 1
    assert EncoderCache(0).put("x", _t(4)) is False  # a zero budget caches nothing


def test_cpu_tier_demotes_and_promotes():
    c = EncoderCache(2 * 400, cpu_capacity_bytes=2 * 400)
    c.put("a", _t(400, 1.0))
    c.put("b", _t(400, 2.0))
    c.put("c", _t(400, 3.0))  # a -> CPU
    assert c.tier("a") == "cpu" and c.stats.cpu_entries == 1 and c.stats.cpu_bytes == 400
    got = c.get("a")  # promoted back; b (oldest) goes to the CPU tier
    assert torch.equal(got, _t(400, 1.0))
    assert c.tier("a") == "gpu" and c.tier("b") == "cpu"
    assert (c.stats.hits, c.stats.cpu_hits, c.stats.evictions) == (1, 1, 2)
    c.put("d", _t(400))  # c -> CPU; CPU tier now b, c
    c.put("e", _t(400))  # a -> CPU; b dropped from the CPU tier
    assert c.tier("b") is None and c.tier("c") == "cpu" and c.tier("a") == "cpu"
    assert c.stats.cpu_evictions == 1 and c.stats.cpu_bytes == 800 and c.stats.bytes == 800


def test_cpu_tier_takes_what_referenced_gpu_entries_leave_out():
    c = EncoderCache(400, cpu_capacity_bytes=800)
    c.acquire(["a", "b"])
    assert c.put("a", _t(400)) and c.put("b", _t(400))
    assert c.tier("a") == "gpu" and c.tier("b") == "cpu"
    assert c.get("b") is not None and c.tier("b") == "cpu"  # no room on the GPU: served, stays
    c.release(["a", "b"])
    assert c.get("b") is not None and c.tier("b") == "gpu" and c.tier("a") == "cpu"


def test_discard_and_clear():
    c = EncoderCache(1000, cpu_capacity_bytes=1000)
    c.put("a", _t(400))
    c.put("b", _t(400))
    c.discard("a")
    assert c.tier("a") is None and c.stats.entries == 1 and c.stats.bytes == 400
    c.clear()
    assert len(c) == 0 and c.stats.bytes == 0 and c.stats.cpu_bytes == 0


# ---------------------------------------------------------------- hashing


def _frames(n: int, h: int = 84, w: int = 112, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    return [np.roll(base, 7 * i, axis=1) for i in range(n)]


def _stamps(n: int, fps: float = 2.0) -> list[float]:
    return [i / fps for i in range(n)]


def test_patch_hashes_name_temporal_patches():
    p = MediaProcessor(model_key="m")
    frames = _frames(10)
    short = p.process_video(frames[:6], timestamps=_stamps(6), max_pixels=112 * 112)
    long = p.process_video(frames, timestamps=_stamps(10), max_pixels=112 * 112)
    assert short.grid_thw == (3, 8, 10) and short.tokens_per_temporal_patch == TPP
    assert len(short.patch_hashes) == 3 and len(long.patch_hashes) == 5
    assert long.patch_hashes[:3] == short.patch_hashes  # same 2 frames, same key
    assert len(set(long.patch_hashes)) == 5 and short.content_hash != long.content_hash
    again = p.process_video(frames[:6], timestamps=_stamps(6), max_pixels=112 * 112)
    assert again.content_hash == short.content_hash and again.hash_s > 0
    other = p.process_video(_frames(6, seed=1), timestamps=_stamps(6), max_pixels=112 * 112)
    assert not set(other.patch_hashes) & set(short.patch_hashes)
    # the model and the preprocessing identity are part of the key
    assert MediaProcessor(model_key="m2").process_video(frames[:6], timestamps=_stamps(6), max_pixels=112 * 112).patch_hashes[0] != short.patch_hashes[0]
    flat = hashing.compute_patch_hashes(short.pixel_values, (3, 8, 10), model_key="m", merge_size=1)
    assert flat[0] != short.patch_hashes[0]
    # fps changes M-RoPE positions: same patches, different item identity
    slow = p.process_video(frames[:6], timestamps=_stamps(6, fps=1.0), max_pixels=112 * 112)
    assert slow.patch_hashes == short.patch_hashes and slow.content_hash != short.content_hash
    img = p.process_image(frames[0])
    assert len(img.patch_hashes) == 1 and img.content_hash
    # serial and threaded hashing agree
    pv, grid = long.pixel_values, long.grid_thw
    assert hashing.compute_patch_hashes(pv, grid, model_key="m", parallel=True) == \
        hashing.compute_patch_hashes(pv, grid, model_key="m", parallel=False) == long.patch_hashes


def test_bare_processor_does_not_hash():
    item = MediaProcessor().process_image(_frames(1)[0])
    assert item.patch_hashes is None and item.content_hash is None


# ---------------------------------------------------------------- engine


def _user(*parts) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]}


def _video(frames, fps=2.0) -> dict:
    return {"type": "video", "video": {"frames": frames, "timestamps": _stamps(len(frames), fps)}, "max_pixels": 112 * 112}


def _image(seed: int) -> dict:
    return {"type": "image", "image": np.random.default_rng(seed).integers(0, 255, (56, 84, 3), dtype=np.uint8)}


def _make(tiny_model_dir, **options) -> Engine:
    # the prefix cache is off so that repeated prompts really reach the encoder cache
    options.setdefault("enable_prefix_caching", False)
    return Engine.from_pretrained(tiny_model_dir, device="cpu", kv_cache_tokens=8192, block_size=16, **options)


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    return _make(tiny_model_dir)


def _same(res, expected, tol=1e-5) -> None:
    """Same tokens and logits within `tol` (relative, per row) as `expected`."""
    assert res.token_ids == expected.token_ids
    ours, ref = torch.stack(res.logits), torch.stack(expected.logits)
    assert ((ours - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item() < tol


def _ask(engine, plain, hf_model, conv, sampling=GREEDY):
    """Runs conv on the cached engine; checks logits against the cache-off engine and
    transformers; returns (result, vision tokens encoded for it)."""
    before = engine.llm.runner.vision_tokens_encoded
    [res] = engine.generate([conv], sampling, return_logits=True)
    encoded = engine.llm.runner.vision_tokens_encoded - before
    [off] = plain.generate([conv], sampling, return_logits=True)
    _same(res, off)
    items = engine.load_media(conv)
    prompt = build_prompt(engine.tokenizer, conv, items)
    ref = reference_logits(hf_model, prompt.token_ids, [(r.offset, m) for r, m in zip(prompt.ranges, prompt.media)], res.token_ids)
    assert_close_logits(res.logits, ref)
    return res, encoded


def test_hashed_once_per_item_and_never_by_the_engine_loop(tiny_model_dir):
    eng = _make(tiny_model_dir, encoder_cache_bytes=1 << 20)
    conv = [_user(_image(1), _video(_frames(6)), "Relate them.")]
    n0 = hashing.STATS.items_hashed
    items = eng.load_media(conv)
    assert hashing.STATS.items_hashed - n0 == 2
    assert all(m.patch_hashes and m.content_hash for m in items)
    prompt = build_prompt(eng.tokenizer, conv, items)
    media = [(r.offset, m) for r, m in zip(prompt.ranges, prompt.media)]
    snap = hashing.STATS.snapshot()
    # two turns over the same items: the scheduler and runner read the stored hashes only
    for question in range(2):
        eng.submit(EngineRequest(prompt.token_ids, media, GREEDY)).result()
    assert hashing.STATS.snapshot() == snap
    assert eng.llm.runner.encoder_cache.stats.hits == 4  # second turn: 1 image + 3 video patches
    n1 = hashing.STATS.items_hashed
    eng.generate([conv], GREEDY)
    assert hashing.STATS.items_hashed - n1 == 2  # generate processes (and hashes) each item once


def test_same_video_twice_encodes_once(tiny_model_dir, plain, hf_tiny_model):
    eng = _make(tiny_model_dir, encoder_cache_bytes=1 << 20)
    frames = _frames(8, seed=4)
    res1, enc1 = _ask(eng, plain, hf_tiny_model, [_user(_video(frames), "What happens?")])
    assert enc1 == 4 * TPP and res1.metrics.vision_encode_s > 0
    stats = eng.llm.runner.encoder_cache.stats
    assert (stats.misses, stats.hits, stats.entries, stats.bytes) == (4, 0, 4, 4 * ENTRY)
    res2, enc2 = _ask(eng, plain, hf_tiny_model, [_user(_video(frames), "And then, what?")])
    assert enc2 == 0 and res2.metrics.vision_encode_s == 0.0
    assert (stats.misses, stats.hits) == (4, 4)


def test_partial_hit_encodes_only_the_new_patches(tiny_model_dir, plain, hf_tiny_model):
    eng = _make(tiny_model_dir, encoder_cache_bytes=1 << 20)
    stream = _frames(10, seed=5)
    _, enc1 = _ask(eng, plain, hf_tiny_model, [_user(_video(stream[:6]), "So far?")])
    assert enc1 == 3 * TPP
    stats = eng.llm.runner.encoder_cache.stats
    _, enc2 = _ask(eng, plain, hf_tiny_model, [_user(_video(stream), "And now?")])
    assert enc2 == 2 * TPP  # frames 6..9 only
    assert (stats.hits, stats.misses) == (3, 5)


def test_scattered_hits_and_duplicates_within_a_step(tiny_model_dir, plain, hf_tiny_model):
    """Cached patches 1 and 3 of 5: patches 0, 2, 4 are encoded as three sub-items; a batch of
    two requests on the same new video encodes it once."""
    eng = _make(tiny_model_dir, encoder_cache_bytes=1 << 20)
    cache = eng.llm.runner.encoder_cache
    frames = _frames(10, seed=6)
    conv = [_user(_video(frames), "Describe.")]
    _ask(eng, plain, hf_tiny_model, conv)
    keys = eng.load_media(conv)[0].patch_hashes
    for k in (0, 2, 4):
        cache.discard(keys[k])
    _, enc = _ask(eng, plain, hf_tiny_model, conv)
    assert enc == 3 * TPP
    # two requests in one step on a video nobody has seen: encoded once
    other = [_user(_video(_frames(6, seed=7)), "Describe.")]
    before = eng.llm.runner.vision_tokens_encoded
    a, b = eng.generate([other, other], GREEDY, return_logits=True)
    assert eng.llm.runner.vision_tokens_encoded - before == 3 * TPP
    [ref] = plain.generate([other], GREEDY, return_logits=True)
    for r in (a, b):
        _same(r, ref)


def test_static_video_repeats_one_patch(tiny_model_dir, plain, hf_tiny_model):
    """Identical frame pairs within one clip share one key: encoded once, reused in place."""
    eng = _make(tiny_model_dir, encoder_cache_bytes=1 << 20)
    still = _frames(1, seed=8) * 8
    conv = [_user(_video(still), "Does anything move?")]
    _, enc = _ask(eng, plain, hf_tiny_model, conv)
    assert enc == TPP and eng.llm.runner.encoder_cache.stats.entries == 1


def test_different_videos_of_identical_size_never_share(tiny_model_dir, plain, hf_tiny_model):
    eng = _make(tiny_model_dir, encoder_cache_bytes=1 << 20)
    cache = eng.llm.runner.encoder_cache
    _ask(eng, plain, hf_tiny_model, [_user(_video(_frames(8, seed=10)), "What happens?")])
    _, enc = _ask(eng, plain, hf_tiny_model, [_user(_video(_frames(8, seed=11)), "What happens?")])
    assert enc == 4 * TPP and cache.stats.hits == 0 and cache.stats.entries == 8


def test_tiny_capacity_evicts_and_stays_exact(tiny_model_dir, plain, hf_tiny_model):
    eng = _make(tiny_model_dir, encoder_cache_bytes=3 * ENTRY)
    cache = eng.llm.runner.encoder_cache
    a, b = _frames(8, seed=12), _frames(6, seed=13)
    convs = [
        [_user(_video(a), _image(14), "One?")],
        [_user(_video(b), "Two?")],
        [_user(_video(a), "Three?")],
        [_user(_image(14), _video(b), "Four?")],
    ]
    for conv in convs:
        _ask(eng, plain, hf_tiny_model, conv)
    assert cache.stats.evictions > 0 and cache.stats.bytes <= 3 * ENTRY
    assert cache.stats.rejected > 0  # entries of a running request are never evicted for its own


def test_cpu_tier_serves_evicted_entries(tiny_model_dir, plain, hf_tiny_model):
    eng = _make(tiny_model_dir, encoder_cache_bytes=4 * ENTRY, encoder_cache_cpu_bytes=16 * ENTRY)
    cache = eng.llm.runner.encoder_cache
    a, b = _frames(8, seed=20), _frames(8, seed=21)
    _ask(eng, plain, hf_tiny_model, [_user(_video(a), "First?")])
    _ask(eng, plain, hf_tiny_model, [_user(_video(b), "Second?")])  # pushes a to the CPU tier
    assert cache.stats.evictions == 4 and cache.stats.cpu_entries == 4
    res, enc = _ask(eng, plain, hf_tiny_model, [_user(_video(a), "First again?")])
    assert enc == 0 and res.metrics.vision_encode_s == 0.0 and cache.stats.cpu_hits == 4


def test_preemption_with_cache_is_exact(tiny_model_dir, plain, hf_tiny_model):
    eng = Engine.from_pretrained(tiny_model_dir, device="cpu", kv_cache_tokens=160, block_size=16,
                                 max_num_batched_tokens=32, encoder_cache_bytes=2 * ENTRY, enable_prefix_caching=False)
    convs = [[_user(_video(_frames(8, seed=30)), "What happens?")], [_user(_image(31), "What is it?")],
             [_user("Just text.")]]
    sampling = SamplingParams(max_new_tokens=10, ignore_eos=True)
    results = eng.generate(convs, sampling, return_logits=True)
    expected = plain.generate(convs, sampling, return_logits=True)
    for r, e in zip(results, expected):
        _same(r, e, tol=1e-4)  # chunked prefill and preemption reorder float sums slightly
    eng.generate([[_user("Flush.")]], GREEDY)  # the next step releases every finished request
    assert not eng.llm.runner._cache_holds and not eng.llm.runner.encoder_cache._refs


def test_vision_plan_matches_uncached_run(tiny_model_dir, make_media_item):
    """run_vision with the cache (cold, warm, partially warm) equals run_vision without it."""
    eng = _make(tiny_model_dir)
    runner = eng.llm.runner
    items = [make_media_item("video", (4, 4, 8), seed=s) for s in range(2)] + [make_media_item("image", (1, 6, 4), seed=5)]
    for it in items:
        hashing.hash_item(it, model_key="t")
    base = runner.run_vision(items)
    runner.encoder_cache = EncoderCache(1 << 20)
    try:
        for round_ in range(3):
            if round_ == 2:
                runner.encoder_cache.discard(items[0].patch_hashes[1])
                runner.encoder_cache.discard(items[1].patch_hashes[3])
            got = runner.run_vision(items)
            for g, b in zip(got, base):
                assert g.shape == b.shape and torch.allclose(g, b, rtol=1e-5, atol=1e-6)
            assert sum(runner.last_encoded_tokens) == [2 * 4 * 8 + 6, 0, 8 + 8][round_]
        plan = VisionPlan(runner.encoder_cache, [make_media_item("video", (2, 4, 4), seed=9)])
        assert len(plan.to_encode) == 1 and plan.encoded_tokens == [8]  # unhashed: whole, uncached
    finally:
        runner.encoder_cache = None


def test_config_options():
    from omnistream.config import EngineConfig
    from omnistream.errors import ConfigError

    cfg = EngineConfig.from_kwargs("m", encoder_cache_bytes=1 << 20, encoder_cache_cpu_bytes=1 << 22)
    assert cfg.cache.encoder_cache_bytes == 1 << 20 and cfg.cache.encoder_cache_cpu_bytes == 1 << 22
    with pytest.raises(ConfigError):
        EngineConfig.from_kwargs("m", encoder_cache_bytes=-1)
    assert EngineConfig.from_kwargs("m").cache.encoder_cache_bytes == 0
