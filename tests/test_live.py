"""Live sessions: frames in one by one, questions at any moment; exact over retained frames."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from omnistream.entrypoints.api import Engine
from omnistream.engine.protocol import EngineRequest
from omnistream.engine.sampling import SamplingParams
from omnistream.errors import UserInputError
from omnistream.media.frame_memory import FrameMemoryConfig
from tests.reference import assert_close_logits, reference_logits

GREEDY = SamplingParams(max_new_tokens=4, ignore_eos=True)
SIZE = 56 * 56  # frames resized to 56x56: 4 LLM tokens per temporal patch


def scene_frames(n_scenes: int, per_scene: int, seed: int = 0, side: int = 64):
    """Frames of n_scenes distinct textures with slight motion inside a scene (known cuts)."""
    rng = np.random.default_rng(seed)
    frames = []
    for s in range(n_scenes):
        base = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
        for i in range(per_scene):
            frames.append(np.roll(base, i, axis=1))
    return frames


def _engine(model_dir, **opts) -> Engine:
    opts.setdefault("kv_cache_tokens", 4096)
    opts.setdefault("encoder_cache_bytes", 4 << 20)
    return Engine.from_pretrained(model_dir, device="cpu", block_size=16, **opts)


def _feed(live, frames, t0: float = 0.0, fps: float = 2.0):
    live.add_frames(frames, [t0 + i / fps for i in range(len(frames))])
    live.flush(timeout=120)


def test_live_answer_equals_fresh_run_over_retained_frames(tiny_model_dir, hf_tiny_model):
    eng = _engine(tiny_model_dir)
    mem = FrameMemoryConfig(star_capacity=4, stream_capacity=4)
    live = eng.live_session(system="You watch a camera.", memory=mem, max_pixels=SIZE)
    _feed(live, scene_frames(4, 6, seed=1))  # 24 frames, 3 cuts: evictions from both memories
    stats = live.memory.stats()
    assert stats.frames_added == 24 and stats.star_size <= 4 and stats.stream_size <= 4
    for question in ("What is happening?", "And now?"):
        ids, media = live.prompt_for(question)
        res = live.ask(question, GREEDY, return_logits=True)
        assert_close_logits(res.logits, reference_logits(hf_tiny_model, ids, media, res.token_ids))
        # a fresh engine without any cache over the same retained frames gives the same answer
        fresh = _engine(tiny_model_dir, enable_prefix_caching=False, encoder_cache_bytes=0)
        [again] = fresh.run([EngineRequest(ids, media, GREEDY)])
        assert again.token_ids == res.token_ids
        assert res.live.visual_tokens == media[0][1].num_tokens
        for key in ("total_latency", "encoding_latency", "prefill_latency", "generation_latency", "frames_encoded",
                    "kv_cache_length", "star_size", "stream_size", "compression_ratio"):
            assert hasattr(res.live, key)
    _feed(live, scene_frames(1, 6, seed=2), t0=100.0)  # more frames, a new scene, then ask again
    ids, media = live.prompt_for("What changed?")
    res = live.ask("What changed?", GREEDY, return_logits=True)
    assert_close_logits(res.logits, reference_logits(hf_tiny_model, ids, media, res.token_ids))


def test_question_without_new_frames_reuses_everything(tiny_model_dir):
    eng = _engine(tiny_model_dir)
    live = eng.live_session(max_pixels=SIZE)
    _feed(live, scene_frames(2, 8, seed=3))
    live.ask("First?", GREEDY)
    res = live.ask("Second?", GREEDY)
    assert res.live.frames_encoded == 0 and res.live.encoding_latency == 0.0
    # recomputed: the tail of the last full block + the previous answer's end + the new turn
    assert res.metrics.prompt_tokens - res.metrics.cached_tokens < 16 + 20
    assert res.live.visual_tokens == 4 * len(live.patches)


# slices: sliced encode-ahead on (engine/encode_ahead.py; the GPU default): a live session's
# own frames are prefilled at its next question, not while its answer decodes, so it must
# change nothing here
@pytest.mark.parametrize("policy,slices", [("exact", None), ("fast", None), ("exact", 1), ("fast", 1)])
def test_ingestion_during_an_answer_does_not_change_it(tiny_model_dir, policy, slices):
    frames = scene_frames(2, 8, seed=4)
    later = scene_frames(1, 8, seed=5)
    quiet = _engine(tiny_model_dir).live_session(max_pixels=SIZE, policy=policy)
    _feed(quiet, frames)
    expected = quiet.ask("Describe.", SamplingParams(max_new_tokens=12, ignore_eos=True)).token_ids

    eng = _engine(tiny_model_dir, vision_slice_rows=slices)
    live = eng.live_session(max_pixels=SIZE, policy=policy)
    _feed(live, frames)
    started = threading.Event()
    submit = eng.submit

    def submit_and_signal(spec):
        if spec.sampling.max_new_tokens == 12:  # the ask, not a prefill or a KV edit
            started.set()
        return submit(spec)

    eng.submit = submit_and_signal
    feeder = threading.Thread(target=lambda: (started.wait(30), live.add_frames(later, [50 + i / 2 for i in range(8)])))
    feeder.start()
    res = live.ask("Describe.", SamplingParams(max_new_tokens=12, ignore_eos=True))
    feeder.join()
    live.flush(timeout=60)
    assert res.token_ids == expected
    assert live.memory.stats().frames_added == 24  # the new frames were ingested meanwhile
    assert live.ask("And now?", SamplingParams(max_new_tokens=2, ignore_eos=True)).token_ids  # and are usable


def test_two_hour_stream_stays_bounded(tiny_model_dir):
    eng = _engine(tiny_model_dir, kv_cache_tokens=2048, encoder_cache_bytes=64 << 10)
    live = eng.live_session(max_pixels=SIZE, memory=FrameMemoryConfig(star_capacity=8, stream_capacity=8))
    rng = np.random.default_rng(6)
    scenes = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(40)]
    fps, minutes = 2, 120
    for minute in range(minutes):  # a new scene every 3 minutes, motion inside scenes
        base = scenes[(minute // 3) % len(scenes)]
        frames = [np.roll(base, (minute * 120 + i) % 32, axis=0) for i in range(60 * fps)]
        live.add_frames(frames, [minute * 60 + i / fps for i in range(60 * fps)])
        if minute % 30 == 29:
            live.flush(timeout=300)
            live.ask("What is on screen?", SamplingParams(max_new_tokens=2, ignore_eos=True))
            s = live.memory.stats()
            assert s.star_size <= 8 and s.stream_size <= 8
            assert eng.llm.runner.encoder_cache.stats.bytes <= 64 << 10
            assert len(live.patches) <= 8
    live.flush(timeout=300)
    assert live.memory.stats().frames_added == minutes * 60 * fps
    live.close()
    assert eng.llm.blocks.num_free == eng.llm.blocks.num_blocks  # all KV back in the pool


def test_errors(tiny_model_dir):
    eng = _engine(tiny_model_dir)
    live = eng.live_session(max_pixels=SIZE)
    with pytest.raises(UserInputError):
        live.ask("Anything?")
    with pytest.raises(UserInputError):
        live.add_frames([np.zeros((8, 8, 3), np.uint8)], [0.0, 1.0])


def test_exact_recomputes_from_the_first_changed_patch(tiny_model_dir, hf_tiny_model):
    """Blocks are named patch by patch (cache/prefix_hash.py): when the Stream slides, the KV
    of the system prompt and the patches before the first change is reused, the rest recomputed,
    and the answer is still exact."""
    eng = _engine(tiny_model_dir)
    mem = FrameMemoryConfig(star_capacity=16, stream_capacity=8, dedupe_threshold=0.0)
    live = eng.live_session(system="You watch.", max_pixels=SIZE, memory=mem, prefill_on_arrival=False)
    frames = scene_frames(4, 6, seed=21)
    _feed(live, frames[:20])
    live.ask("First?", GREEDY)
    before = [p.patch_id for p in live.memory.retained()]
    _feed(live, frames[20:], t0=10.0)
    after = [p.patch_id for p in live.memory.retained()]
    k = next(i for i, (a, b) in enumerate(zip(before, after)) if a != b)
    assert k >= 1, (before, after)  # the Star patch is unchanged
    ids, media = live.prompt_for("Now?")
    res = live.ask("Now?", GREEDY, return_logits=True)
    off, item = media[0]
    unchanged = off + k * item.tokens_per_temporal_patch
    assert res.metrics.cached_tokens == 16 * (unchanged // 16) > 0
    assert_close_logits(res.logits, reference_logits(hf_tiny_model, ids, media, res.token_ids))


def test_idle_worker_ends_and_the_next_frame_starts_another(tiny_model_dir, monkeypatch):
    """A live session dropped without close() kept its worker thread (and so itself and its
    engine) forever; the worker now ends when idle and the next frame starts a new one."""
    import time

    from omnistream.sessions import live as live_module

    monkeypatch.setattr(live_module, "WORKER_IDLE_S", 0.05)
    eng = _engine(tiny_model_dir)
    live = eng.live_session(max_pixels=SIZE)
    frames = scene_frames(2, 8, seed=3)
    _feed(live, frames[:4])
    live.flush()

    def workers():
        return [t for t in threading.enumerate() if t.name == f"live-{live.id}"]

    deadline = time.monotonic() + 10
    while workers():
        assert time.monotonic() < deadline, "the idle worker did not end"
        time.sleep(0.01)
    _feed(live, frames[4:], t0=2.0)
    res = live.ask("What now?", GREEDY)
    assert live.memory.stats().frames_added == len(frames) and res.live.frames_in_context > 4
    live.close()
    assert not workers()
    eng.close()
