"""Frame memory (Star + Stream over temporal patches) on synthetic videos with known cuts."""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest

from omnistream.errors import ConfigError, MediaError
from omnistream.media.frame_memory import (
    FrameMemory,
    FrameMemoryConfig,
    FramePairer,
    TemporalPatch,
    patch_feature,
)

SIDE = 32  # frame side in pixels (small: fast)


def scene_frame(scene: int, k: int, rng: np.random.Generator, side: int = SIDE) -> np.ndarray:
    """Frame k of scene `scene`: its own colour and stripe texture, a square moving 3 px per
    frame (so consecutive patches are not duplicates) and slight noise. (side, side, 3) uint8."""
    base = np.array([(scene * 97) % 256, (scene * 53 + 80) % 256, (scene * 151 + 40) % 256], np.float32)
    yy, xx = np.mgrid[0:side, 0:side]
    stripes = 40 * np.sin(2 * np.pi * (xx * (scene % 3 + 1) + yy * (scene % 2 + 1)) / side)
    img = base + stripes[..., None]  # (side, side, 3)
    x0 = (3 * k) % (side - side // 4)
    img[side // 4 : side // 2, x0 : x0 + side // 4] = 0.0 if base @ [0.3, 0.6, 0.1] > 128 else 255.0
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_video(scene_ids: list[int], frames_per_scene: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [scene_frame(s, k, rng) for s in scene_ids for k in range(frames_per_scene)]


def feed(memory: FrameMemory, frames: list[np.ndarray], fps: float = 2.0, check=None) -> list:
    """Pair `frames` and add them; returns the AddResults. `check(memory)` runs after each add."""
    pairer = FramePairer(memory.config)
    results = []
    for i, frame in enumerate(frames):
        patch = pairer.push(frame, i / fps)
        if patch is not None:
            results.append(memory.add_patch(patch))
            if check is not None:
                check(memory)
    return results


def check_invariants(memory: FrameMemory) -> None:
    cfg, stats = memory.config, memory.stats()
    assert len(memory.star) <= cfg.star_patches and len(memory.stream) <= cfg.stream_patches
    assert stats.star_size <= cfg.star_capacity and stats.stream_size <= cfg.stream_capacity
    ids = [p.patch_id for p in memory.retained()]
    times = [t for p in memory.retained() for t in p.timestamps]
    assert ids == sorted(set(ids)) and times == sorted(times)
    assert stats.patches_added == stats.duplicates_dropped + len(ids) + stats.patches_discarded
    assert stats.frames_added == 2 * stats.patches_added
    assert stats.unique_frames == stats.star_size + stats.stream_size == 2 * len(ids)


def test_feature_distance_is_bounded():
    black, white = np.zeros((2, 20, 30, 3), np.uint8), np.full((2, 20, 30, 3), 255, np.uint8)
    fb, fw = patch_feature(black, 16, 8), patch_feature(white, 16, 8)
    assert fb.shape == (16 * 16 + 24,) and fb.dtype == np.float32
    assert np.abs(fb - fw).sum() == pytest.approx(1.0, abs=1e-5)
    frames = np.stack(make_video([0], 2))
    assert np.abs(patch_feature(frames, 16, 8) - patch_feature(frames.copy(), 16, 8)).sum() == 0.0
    small = np.zeros((2, 5, 7, 3), np.uint8)  # smaller than the thumbnail: nearest sampling
    assert patch_feature(small, 16, 8).shape == fb.shape


def test_scene_cuts_are_promoted_and_kept():
    memory = FrameMemory()  # defaults: 10 Star patches, 10 Stream patches, threshold 0.6
    per_scene = 24  # 12 patches per scene: every scene's first patch leaves the Stream
    results = feed(memory, make_video([0, 1, 2, 3, 4], per_scene), check=check_invariants)
    first_ids = {s * per_scene // 2 for s in range(5)}
    by_id = {r.patch_id: r for r in results}
    assert all(by_id[i].importance >= 0.6 for i in first_ids)
    inside = [r.importance for r in results if r.patch_id not in first_ids and not r.dropped_duplicate]
    assert np.median(inside) < 0.6
    assert {p.patch_id for p in memory.star} == first_ids  # the cuts, and nothing else
    assert all(p.importance >= 0.6 for p in memory.star)
    promoted = {r.left_stream for r in results if r.promoted}
    assert promoted == first_ids


def test_cut_back_to_a_scene_in_star_is_not_promoted_again():
    memory = FrameMemory()
    per_scene = 24
    feed(memory, make_video([0, 1, 0, 2, 2], per_scene, seed=1), check=check_invariants)
    star_ids = {p.patch_id for p in memory.star}
    assert star_ids == {0, per_scene // 2, 3 * per_scene // 2}  # scene 0 once, 1, 2


def test_exact_duplicates_are_dropped():
    frames = make_video([0], 20)
    still = frames[-1]
    frames += [still] * 30 + make_video([1], 20, seed=2)  # a frozen stretch of 30 frames
    memory = FrameMemory()
    results = feed(memory, frames, check=check_invariants)
    dropped = [r.patch_id for r in results if r.dropped_duplicate]
    # Frames 20..49 are the frozen frame 19: patch 9 = (18, still) is kept, patches 10..24 =
    # (still, still) are near-duplicates of it (half equal) or exact repeats; moving patches are kept.
    assert dropped == list(range(10, 25))
    assert memory.stats().duplicates_dropped == 15
    retained = {p.patch_id for p in memory.retained()}
    assert retained.isdisjoint(dropped)
    assert memory.stats().compression_ratio == pytest.approx(70 / memory.stats().unique_frames)


def test_small_capacities_keep_the_most_important():
    cfg = FrameMemoryConfig(star_capacity=6, stream_capacity=5)  # 3 Star patches, 2 Stream patches
    memory = FrameMemory(cfg)
    removed: set[int] = set()

    def check(mem: FrameMemory) -> None:
        check_invariants(mem)
        assert removed.isdisjoint(p.patch_id for p in mem.retained())

    pairer, results = FramePairer(cfg), []
    for i, frame in enumerate(make_video(list(range(12)), 8, seed=3)):
        patch = pairer.push(frame, i * 0.5)
        if patch is not None:
            results.append(memory.add_patch(patch))
            removed.update(results[-1].removed)
            check(memory)
    assert len(memory.star) == 3 and len(memory.stream) == 2
    assert all(p.importance >= cfg.importance_threshold for p in memory.star)
    assert sum(r.promoted for r in results) >= 3


def hand_patch(patch_id: int, axis: int, length: float, cfg: FrameMemoryConfig) -> TemporalPatch:
    """A patch whose feature is `length` along `axis`: d(a, b) = a.length + b.length (axes differ)."""
    feature = np.zeros(cfg.feature_dim, np.float32)
    feature[axis] = length
    frame = np.zeros((2, 2, 3), np.uint8)
    return TemporalPatch(patch_id, (frame, frame), (float(patch_id), float(patch_id)), feature)


def test_star_eviction_policy_on_hand_made_features():
    # 2 Star patches, 1 Stream patch, s(d) = 1 - exp(-d / 0.1).
    cfg = FrameMemoryConfig(star_capacity=4, stream_capacity=2)
    memory = FrameMemory(cfg)
    lengths = [0.0, 0.3, 0.2, 0.5, 0.5]  # patch i lies on axis i
    results = [memory.add_patch(hand_patch(i, i, x, cfg)) for i, x in enumerate(lengths)]
    s = lambda d: 1 - np.exp(-d / 0.1)  # noqa: E731
    assert results[0].importance == 1.0  # the first patch starts a scene
    # P1: change s(0.3), novelty vs Star {P0} s(0.3) -> ~0.90: promoted when P2 arrives.
    assert results[2].left_stream == 1 and results[2].promoted and results[2].evicted_star is None
    # P2: Star {P0, P1} is full; change s(0.5) * novelty s(min(0.2, 0.5)) ~0.86 < P1's ~0.90.
    assert results[3].left_stream == 2 and not results[3].promoted and results[3].removed == (2,)
    # P3: s(0.7) * s(min(0.5, 0.8)) ~0.99 > ~0.90: enters, evicting P1 (the least important).
    assert results[4].promoted and results[4].evicted_star == 1 and results[4].removed == (1,)
    assert [p.patch_id for p in memory.star] == [0, 3]
    assert memory.star[1].importance == pytest.approx(s(0.7) * s(0.5), rel=1e-5)
    assert [p.patch_id for p in memory.retained()] == [0, 3, 4]
    stats = memory.stats()
    assert (stats.patches_discarded, stats.star_size, stats.stream_size) == (2, 4, 2)


def test_config_validation_and_rounding():
    cfg = FrameMemoryConfig(star_capacity=1, stream_capacity=7)
    assert (cfg.star_patches, cfg.stream_patches) == (1, 3)
    for bad in (
        dict(star_capacity=0),
        dict(importance_threshold=1.5),
        dict(dedupe_threshold=-0.1),
        dict(novelty_scale=0.0),
        dict(feature_size=0),
        dict(hist_bins=0),
    ):
        with pytest.raises(ConfigError):
            FrameMemoryConfig(**bad)


def test_pairer_emits_every_two_frames_and_validates():
    cfg = FrameMemoryConfig()
    pairer = FramePairer(cfg, first_patch_id=5)
    frames = make_video([0], 5)
    outs = [pairer.push(f, t) for f, t in zip(frames, [0.0, 0.4, 1.0, 1.0, 2.5])]
    assert [o is None for o in outs] == [True, False, True, False, True] and pairer.pending
    assert [o.patch_id for o in outs if o] == [5, 6] and outs[1].timestamps == (0.0, 0.4)
    frames[0][:] = 0  # the pairer copied its frames
    assert outs[1].frames[0].any()
    last = pairer.flush()
    assert last.patch_id == 7 and last.timestamps == (2.5, 2.5) and not pairer.pending
    assert last.frames[0] is last.frames[1] and pairer.flush() is None
    with pytest.raises(MediaError):
        pairer.push(frames[0], 1.0)  # time went back
    with pytest.raises(MediaError):
        pairer.push(np.zeros((16, 16, 3), np.uint8), 3.0)  # size changed
    with pytest.raises(MediaError):
        pairer.push(frames[0].astype(np.float32), 3.0)
    memory = FrameMemory(cfg)
    memory.add_patch(outs[3])
    with pytest.raises(MediaError):
        memory.add_patch(outs[1])  # older patch after a newer one
    other = TemporalPatch.from_frames(9, (frames[1], frames[2]), (5.0, 5.5), FrameMemoryConfig(feature_size=8))
    with pytest.raises(MediaError):
        memory.add_patch(other)  # feature from another config


def two_hour_frames(rng: np.random.Generator, n: int = 14_400):
    """n frames: scenes of 10..200 frames drawn from 50 looks (8 frames each, cycled), 20% of them
    frozen on their first frame. Yields (SIDE, SIDE, 3) uint8 frames."""
    pool = [[scene_frame(s, k, rng) for k in range(8)] for s in range(50)]  # [scene][k]
    scene, emitted = 0, 0
    while emitted < n:
        scene, length, frozen = scene + 1, int(rng.integers(10, 200)), rng.random() < 0.2
        for k in range(min(length, n - emitted)):
            yield pool[scene % 50][0 if frozen else k % 8]
        emitted += length


def test_two_hour_stream_stays_bounded():
    """14,400 frames at 2 fps (32x32): capacities hold at every step, the memory's footprint is
    bounded by the capacities, and nothing grows over the last half hour (tracemalloc)."""
    cfg = FrameMemoryConfig()
    memory, pairer = FrameMemory(cfg), FramePairer(cfg)
    footprints, traced = [], []
    try:
        for i, frame in enumerate(two_hour_frames(np.random.default_rng(7))):
            if i in (10_800, 14_399):  # trace the last half hour only (tracing is slow)
                gc.collect()
                tracemalloc.start() if i == 10_800 else traced.append(tracemalloc.get_traced_memory()[0])
            patch = pairer.push(frame, i / 2.0)
            if patch is not None:
                memory.add_patch(patch)
                check_invariants(memory)
            if i % 1000 == 999:
                footprints.append(memory.nbytes())
    finally:
        tracemalloc.stop()
    stats = memory.stats()
    assert stats.frames_added == 14_400 and stats.duplicates_dropped > 1000
    assert stats.star_size == cfg.star_capacity and stats.stream_size == cfg.stream_capacity
    assert stats.compression_ratio == pytest.approx(14_400 / 40)
    patch_bytes = 2 * SIDE * SIDE * 3 + 4 * cfg.feature_dim  # frames + float32 feature
    bound = (cfg.star_patches + cfg.stream_patches) * patch_bytes + 4 * cfg.star_patches * cfg.feature_dim
    assert max(footprints) <= bound
    # Allocated during the last half hour and still held: part of the memory's content (~110 KB of
    # its ~156 KB), no per-patch growth (1,800 patches went through: ~35 bytes each would fail).
    assert traced[0] <= memory.nbytes() + (16 << 10)
