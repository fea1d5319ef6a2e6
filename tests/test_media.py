"""Media ingestion: resize rules, sampling rules, decoding of real-world-like and broken files,
and pixel-exact agreement with transformers' Qwen2-VL image processor (PIL backend, the one that
loads without torchvision)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from omnistream.errors import ConfigError, MediaError, UserInputError
from omnistream.media.image import load_image
from omnistream.media.patchify import normalize, normalize_rows, patchify
from omnistream.media.processor import MediaConfig, MediaProcessor
from omnistream.media.resize import (
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    resize_frames,
    smart_resize,
    video_frame_max_pixels,
)
from omnistream.media.samples import (
    write_broken_corpus,
    write_image,
    write_media_corpus,
    write_sample_video,
    write_truncated_video,
)
from omnistream.media.video import decode_video, frames_from_list, smart_nframes

VIDEO_SUFFIXES = {".mp4", ".webm", ".mkv", ".avi"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_media_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_broken_corpus(tmp_path_factory.mktemp("broken"))


@pytest.fixture(scope="module")
def h264(corpus: list[Path]) -> Path:
    return next(p for p in corpus if p.name == "h264.mp4")  # 320x240, 10 fps, 40 frames


@pytest.fixture(scope="module")
def reference():
    """transformers' Qwen2-VL image processor with the Qwen2.5-VL checkpoint's pixel bounds."""
    module = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    return module.Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)


# ---------------------------------------------------------------- resize rules


@pytest.mark.parametrize(
    ("size", "bounds", "expected"),
    [
        ((224, 224), (3136, 12845056), (224, 224)),  # already on the grid
        ((100, 150), (3136, 12845056), (112, 140)),  # round 3.57 -> 4, 5.36 -> 5
        ((10, 10), (3136, 12845056), (56, 56)),  # tiny: scaled up to min_pixels
        ((5000, 4000), (3136, 12845056), (4004, 3192)),  # too big: scaled down with floor
        ((50, 10000), (3136, 12845056), (56, 9996)),  # aspect ratio exactly 200 is allowed
        ((240, 320), (VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS), (280, 392)),  # video min: ceil up
        ((1080, 1920), (VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS), (560, 1008)),  # video max: floor down
    ],
)
def test_smart_resize_hand_computed(size, bounds, expected):
    assert smart_resize(*size, 28, *bounds) == expected


def test_smart_resize_matches_transformers():
    module = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    rng = random.Random(0)
    for _ in range(2000):
        h, w = rng.randint(15, 5000), rng.randint(15, 5000)
        if max(h, w) / min(h, w) > 200:
            continue
        lo, hi = rng.choice([(3136, 12845056), (VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS), (3136, 200704)])
        assert smart_resize(h, w, 28, lo, hi) == module.smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


@pytest.mark.parametrize("size", [(1, 201), (0, 10), (10, -1)])
def test_smart_resize_rejects_absurd_sizes(size):
    with pytest.raises(MediaError):
        smart_resize(*size)


def test_video_frame_max_pixels():
    assert video_frame_max_pixels(4) == VIDEO_MAX_PIXELS  # short clip: per-frame cap
    assert video_frame_max_pixels(768) == pytest.approx(90316800 / 768 * 2)  # budget shared
    assert video_frame_max_pixels(4000) == int(VIDEO_MIN_PIXELS * 1.05)  # floor
    assert video_frame_max_pixels(4, max_pixels=200_000) == 200_000  # a caller can only lower it
    assert video_frame_max_pixels(768, max_pixels=10**9) == pytest.approx(235200)


def test_resize_frames_is_pil_bicubic():
    frames = np.random.default_rng(0).integers(0, 256, (2, 50, 70, 3), dtype=np.uint8)
    out = resize_frames(frames, 28, 56)
    assert out.shape == (2, 28, 56, 3) and out.dtype == np.uint8
    expected = np.asarray(Image.fromarray(frames[1]).resize((56, 28), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(out[1], expected)


# ---------------------------------------------------------------- patchify / normalise


def test_patchify_layout_by_index():
    """Row (t, bh, bw, mh, mw), column (c, tt, y, x) holds pixel [2t+tt, c, row, col]."""
    n, c, h, w = 3, 3, 56, 84  # odd frame count: the last frame is repeated
    pixels = torch.arange(n * c * h * w, dtype=torch.float32).reshape(n, c, h, w)
    flat, (gt, gh, gw) = patchify(pixels)
    assert (gt, gh, gw) == (2, 4, 6) and flat.shape == (2 * 4 * 6, 3 * 2 * 14 * 14)
    padded = torch.cat([pixels, pixels[-1:]])
    rows = flat.reshape(gt, gh // 2, gw // 2, 2, 2, c, 2, 14, 14)
    for t, bh, bw, mh, mw in [(0, 0, 0, 0, 0), (1, 1, 2, 1, 0), (0, 1, 1, 0, 1), (1, 0, 2, 1, 1)]:
        y0, x0 = (bh * 2 + mh) * 14, (bw * 2 + mw) * 14
        expected = padded[2 * t : 2 * t + 2, :, y0 : y0 + 14, x0 : x0 + 14].permute(1, 0, 2, 3)
        torch.testing.assert_close(rows[t, bh, bw, mh, mw], expected, rtol=0, atol=0)


def test_normalize_matches_transformers_arithmetic():
    frames = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    expected = ((frames.astype(np.float64) * (1 / 255)).astype(np.float32) - mean) / std  # (1, H, W, 3)
    np.testing.assert_array_equal(normalize(frames).permute(0, 2, 3, 1).numpy(), expected)


@pytest.mark.parametrize(
    ("size", "max_pixels"),
    [
        ((224, 224), 12845056),  # on the grid already
        ((97, 61), 12845056),  # odd, non-square
        ((30, 500), 12845056),  # wide strip
        ((20, 20), 12845056),  # below min_pixels: scaled up
        ((700, 1000), 200704),  # above max_pixels: scaled down (small bound keeps the test fast)
    ],
)
def test_image_matches_transformers(size, max_pixels):
    module = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    item = MediaProcessor().process_image(image, max_pixels=max_pixels)
    out = module.Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=max_pixels)(image, return_tensors="pt")
    assert item.grid_thw == tuple(out["image_grid_thw"][0].tolist())
    torch.testing.assert_close(normalize_rows(item.pixel_values), out["pixel_values"], rtol=0, atol=1e-5)


def test_image_files_match_transformers(reference, corpus):
    """Files (jpeg, webp, bmp, grayscale png, palette gif, alpha png). transformers drops alpha
    instead of compositing it on white, so it is fed our RGB array: the comparison covers
    resize + normalise + patchify; the alpha rule is tested in test_load_image_alpha_on_white."""
    images = [p for p in corpus if p.suffix not in VIDEO_SUFFIXES]
    assert len(images) >= 5
    for path in images:
        item = MediaProcessor().process_image(path)
        out = reference(load_image(path), return_tensors="pt")
        assert item.grid_thw == tuple(out["image_grid_thw"][0].tolist()), path.name
        torch.testing.assert_close(normalize_rows(item.pixel_values), out["pixel_values"], rtol=0, atol=1e-5)


def test_two_equal_frames_equal_an_image(reference):
    """A video of two identical frames has the image layout (image = frame repeated in time)."""
    frame = np.random.default_rng(1).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    item = MediaProcessor().process_video([frame, frame])
    lo, hi = VIDEO_MIN_PIXELS, video_frame_max_pixels(2)
    module = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    out = module.Qwen2VLImageProcessorPil(min_pixels=lo, max_pixels=int(hi))(frame, return_tensors="pt")
    assert item.grid_thw == tuple(out["image_grid_thw"][0].tolist())
    torch.testing.assert_close(normalize_rows(item.pixel_values), out["pixel_values"], rtol=0, atol=1e-5)


# ---------------------------------------------------------------- image loading


def test_load_image_alpha_on_white(tmp_path):
    rgba = np.zeros((30, 40, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, 20:, 3] = 255  # left half transparent, right half opaque red
    Image.fromarray(rgba).save(tmp_path / "a.png")
    for src in (tmp_path / "a.png", rgba, Image.fromarray(rgba)):
        rgb = load_image(src)
        assert rgb.shape == (30, 40, 3) and rgb.dtype == np.uint8
        assert (rgb[:, :20] == 255).all() and (rgb[:, 20:] == [200, 0, 0]).all()


def test_load_image_sources(tmp_path):
    gray = np.arange(600, dtype=np.uint8).reshape(20, 30)
    rgb = np.stack([gray, gray // 2, gray // 3], axis=-1)
    assert (load_image(gray) == gray[..., None]).all()  # HW -> 3 equal channels
    gray_file = load_image(write_image(tmp_path / "g.png", mode="L"))
    assert (gray_file[..., 0] == gray_file[..., 2]).all()
    np.testing.assert_array_equal(load_image(rgb.astype(np.float32) / 255), rgb)  # float in [0, 1]
    np.testing.assert_array_equal(load_image(torch.from_numpy(rgb).permute(2, 0, 1)), rgb)  # CHW tensor
    np.testing.assert_array_equal(load_image(torch.from_numpy(rgb)), rgb)  # HWC tensor
    assert load_image(str(write_image(tmp_path / "x.bmp", width=30, height=20))).shape == (20, 30, 3)


def test_load_image_exif_and_16_bit(tmp_path):
    image = Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").shape == (30, 20, 3)  # as a viewer shows it
    deep = np.full((8, 8), 65535, dtype=np.uint16)
    deep[:, :4] = 257 * 100
    Image.fromarray(deep).save(tmp_path / "deep.png")
    rgb = load_image(tmp_path / "deep.png")
    assert (rgb[:, :4] == 100).all() and (rgb[:, 4:] == 255).all()


@pytest.mark.parametrize(
    "src",
    [
        np.zeros((0, 10, 3), dtype=np.uint8),
        np.zeros((10, 10, 2), dtype=np.uint8),
        np.zeros((4, 10, 10, 3), dtype=np.uint8),
        np.full((10, 10, 3), 2.0, dtype=np.float32),
        np.full((10, 10, 3), np.nan, dtype=np.float32),
        "definitely/missing.png",
        12,
    ],
)
def test_load_image_rejects(src):
    with pytest.raises(MediaError, match=r"\S"):
        load_image(src)


def test_load_image_broken_files(tmp_path, broken):
    Image.new("L", (20_001, 1)).save(tmp_path / "huge.png")  # tiny file, absurd side
    png = write_image(tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 3])
    for path in [tmp_path / "huge.png", tmp_path / "cut.png", *broken]:
        with pytest.raises(MediaError) as info:
            MediaProcessor().process_image(path)
        assert str(info.value).strip() and "\n" not in str(info.value), path.name


# ---------------------------------------------------------------- video sampling


@pytest.mark.parametrize(
    ("total", "source_fps", "kwargs", "expected"),
    [
        (40, 10, {}, 8),  # 4 s at 2 fps
        (45, 10, {}, 8),  # 9 frames -> down to even
        (10, 10, {}, 4),  # 1 s -> min_frames 4
        (3, 10, {}, 2),  # fewer frames than min_frames: largest even count
        (1, 10, {}, 1),  # single frame (patchify repeats it)
        (100_000, 30, {}, 768),  # long video: max_frames
        (100, 10, {"fps": 1.0}, 10),
        (40, 10, {"nframes": 6}, 6),
        (40, 10, {"nframes": 5}, 4),  # Python round: 2.5 -> 2
        (40, 10, {"nframes": 7}, 8),  # 3.5 -> 4
        (40, 10, {"nframes": 3}, 4),  # 1.5 -> 2
        (41, 10, {"nframes": 100}, 40),  # clamped to the frames the video has
    ],
)
def test_smart_nframes(total, source_fps, kwargs, expected):
    assert smart_nframes(total, source_fps, **kwargs) == expected


@pytest.mark.parametrize("kwargs", [{"nframes": 1}, {"nframes": 1000}, {"fps": 0.0}, {"fps": float("nan")}])
def test_smart_nframes_rejects(kwargs):
    with pytest.raises(ConfigError):
        smart_nframes(40, 10, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"nframes": 0}, {"fps": -1.0}, {"max_frames": 1}, {"start_s": 2.0, "end_s": 1.0}, {"end_s": float("nan")}],
)
def test_decode_rejects_bad_requests_before_reading(kwargs):
    with pytest.raises(ConfigError):
        decode_video("does/not/matter.mp4", **kwargs)


def test_decode_range_with_too_few_frames(h264):
    with pytest.raises(MediaError):
        decode_video(h264, start_s=1.0, end_s=1.05)  # ceil(10) .. floor(10.5): one frame


def test_decode_sampling_and_timestamps(h264):
    clip = decode_video(h264)
    assert clip.frames.shape == (8, 240, 320, 3) and clip.sample_fps == pytest.approx(2.0)
    assert clip.source_fps == pytest.approx(10.0) and clip.duration_s == pytest.approx(4.0)
    expected = np.linspace(0, 39, 8).round() / 10  # frame pts of the sampled indices
    np.testing.assert_allclose(clip.timestamps, expected, atol=1e-6)
    clip = decode_video(h264, nframes=6)
    np.testing.assert_allclose(clip.timestamps, [0, 0.8, 1.6, 2.3, 3.1, 3.9], atol=1e-6)
    clip = decode_video(h264, start_s=1.0, end_s=3.0)  # frames 10..30: 21 frames -> 4
    np.testing.assert_allclose(clip.timestamps, [1.0, 1.7, 2.3, 3.0], atol=1e-6)


def test_every_corpus_file_decodes(corpus):
    processor = MediaProcessor()
    for path in corpus:
        assert path.stat().st_size < 300_000, path.name
        clip = decode_video(path)
        assert clip.num_frames >= 1 and (clip.num_frames % 2 == 0 or clip.num_frames == 1), path.name
        assert np.all(np.diff(clip.timestamps) > 0), path.name
        if path.suffix in VIDEO_SUFFIXES:
            assert clip.num_frames >= 4 and clip.timestamps[-1] <= clip.duration_s, path.name
            item = processor.process_video(path)
            t, h, w = item.grid_thw
            assert t == clip.num_frames // 2 and h % 2 == 0 and w % 2 == 0, path.name
            assert item.pixel_values.shape == (t * h * w, 1176) and len(item.timestamps) == clip.num_frames
            assert item.second_per_grid_t == pytest.approx(2 / clip.sample_fps)
        else:
            processor.process_image(path)
    sizes = {p.name: decode_video(p).frames.shape[1:3] for p in corpus if "_" in p.stem and "x" in p.stem}
    assert sizes == {"odd_333x197.mp4": (197, 333), "portrait_180x320.mp4": (320, 180)}


def test_variable_frame_rate_keeps_pts(corpus):
    clip = decode_video(next(p for p in corpus if p.name == "vfr.mkv"))
    regular = np.linspace(0, 29, clip.num_frames).round() / 10
    assert np.abs(clip.timestamps - regular).max() > 0.01  # real pts, not index / fps


def test_every_broken_file_raises_media_error(broken):
    assert {p.name for p in broken} >= {"empty.mp4", "truncated.mp4", "random.mp4", "text.mp4"}
    for path in [*broken, broken[0].with_name("missing.mp4")]:
        for call in (decode_video, MediaProcessor().process_video):
            with pytest.raises(MediaError) as info:
                call(path)
            message = str(info.value)
            assert message.strip() and "\n" not in message, path.name


def test_truncated_file_uses_decodable_frames(tmp_path):
    path = write_truncated_video(tmp_path / "cut.mp4", keep=0.6)  # index announces 40 frames
    clip = decode_video(path)
    assert 4 <= clip.num_frames < 8 and np.all(np.diff(clip.timestamps) > 0)
    decodable = round(clip.duration_s * clip.source_fps)
    assert 0 < decodable < 40 and clip.sample_fps == pytest.approx(clip.num_frames / decodable * 10)
    assert clip.timestamps[-1] == pytest.approx((decodable - 1) / 10)


def test_sixty_fps_and_short_clip(corpus):
    fast = decode_video(next(p for p in corpus if p.name == "fps60.mp4"))
    assert fast.num_frames == 4 and fast.sample_fps == pytest.approx(2.0)
    short = decode_video(next(p for p in corpus if p.name == "short_1s.mp4"))
    assert short.num_frames == 4 and short.sample_fps == pytest.approx(4.0)  # min_frames wins


# ---------------------------------------------------------------- frame lists


def test_frames_from_list_irregular_timestamps():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    frames = [base, Image.fromarray(base), torch.from_numpy(base).permute(2, 0, 1), base / 255.0, base]
    stamps = [0.0, 0.3, 0.5, 1.4, 1.5]
    clip = frames_from_list(frames, stamps)
    assert clip.frames.shape == (5, 60, 80, 3) and (clip.frames == base).all()
    assert clip.sample_fps == pytest.approx(4 / 1.5)
    item = MediaProcessor().process_video(frames, timestamps=stamps)
    assert item.grid_thw[0] == 3 and item.timestamps == stamps  # 5 frames padded to 6
    assert item.second_per_grid_t == pytest.approx(2 / (4 / 1.5))
    batch = np.stack([base] * 5)  # one (N, H, W, 3) array, and as an (N, 3, H, W) bf16 tensor
    assert MediaProcessor().process_video(batch).grid_thw == item.grid_thw
    tensor = torch.from_numpy(batch).permute(0, 3, 1, 2).to(torch.bfloat16) / 255
    assert MediaProcessor().process_video(tensor).grid_thw == item.grid_thw
    default = frames_from_list(frames)
    np.testing.assert_allclose(default.timestamps, np.arange(5) / 2.0)
    assert MediaProcessor().process_video(frames, nframes=4).grid_thw[0] == 2


@pytest.mark.parametrize(
    ("frames", "stamps"),
    [
        ([], None),
        ([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9, 3), np.uint8)], None),  # sizes differ
        ([np.zeros((8, 8, 3), np.uint8)] * 2, [1.0, 0.5]),  # going back in time
        ([np.zeros((8, 8, 3), np.uint8)] * 2, [0.0]),  # count mismatch
    ],
)
def test_frames_from_list_rejects(frames, stamps):
    with pytest.raises(MediaError):
        frames_from_list(frames, stamps)


# ---------------------------------------------------------------- processor and config


def test_processor_video_item(h264):
    item = MediaProcessor().process_video(h264, nframes=4)
    assert item.kind == "video" and item.grid_thw == (2, 20, 28) and item.num_tokens == 2 * 10 * 14
    assert item.second_per_grid_t == pytest.approx(2.0)  # 4 of 40 frames at 10 fps: 1 fps
    assert item.decode_s > 0 and item.preprocess_s > 0 and item.content_hash is None
    small = MediaProcessor().process_video(h264, max_pixels=28 * 28 * 16)  # lowers min too
    assert small.grid_thw[1] * small.grid_thw[2] * 14 * 14 <= 28 * 28 * 16


@pytest.mark.parametrize(
    "kwargs",
    [
        {"image_min_pixels": 10},
        {"image_min_pixels": 10**8},
        {"fps": 0},
        {"fps": float("inf")},
        {"max_frames": 1},
        {"min_frames": 10, "max_frames": 8},
        {"temporal_patch_size": 3},
        {"patch_size": True},
    ],
)
def test_media_config_validation(kwargs):
    with pytest.raises(ConfigError):
        MediaConfig(**kwargs)


def test_processor_rejects_absurd_requests(h264):
    processor = MediaProcessor(MediaConfig(max_frames=16))
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ConfigError):
        processor.process_image(image, max_pixels=100)  # below one 28x28 patch
    with pytest.raises(ConfigError):
        processor.process_image(image, min_pixels=10**6, max_pixels=10**5)
    with pytest.raises(ConfigError):
        processor.process_video(h264, nframes=20)
    with pytest.raises(MediaError):
        processor.process_video([image] * 17)
    with pytest.raises(UserInputError):
        processor.process_video(h264, timestamps=[0.0])
    assert processor.process_video(h264, fps=100).grid_thw[0] == 8  # max_frames 16 -> 8 patches


def test_sample_video_codecs(tmp_path):
    for name, codec in [("a.mp4", "mpeg4"), ("b.webm", "vp8"), ("c.mkv", "ffv1")]:
        path = write_sample_video(tmp_path / name, seconds=1.0, width=64, height=48, codec=codec)
        assert path.stat().st_size < 300_000 and decode_video(path).num_frames == 4
