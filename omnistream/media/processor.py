"""Media ingestion front door: image / video source -> `MediaItem` (decode, sample, resize,
patchify), with the pixel and frame rules of Qwen2.5-VL.

Flow: load_image / decode_video / frames_from_list (decode_s) -> smart_resize on the first
frame's size -> PIL bicubic resize of every frame -> patchify of the uint8 pixels
(preprocess_s; CLIP normalisation runs on the device, in the model's prepare_pixels) ->
content hashes (hash_s; media/hashing.py), once per item, when the processor
has a `model_key` (the engine always passes one; a bare MediaProcessor() does not hash).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from omnistream.errors import ConfigError, MediaError
from omnistream.media.hashing import hash_item
from omnistream.media.image import ImageSource, load_image
from omnistream.media.item import MediaItem
from omnistream.media.patchify import patchify
from omnistream.media.resize import (
    FPS,
    FPS_MAX_FRAMES,
    FPS_MIN_FRAMES,
    FRAME_FACTOR,
    IMAGE_FACTOR,
    IMAGE_MAX_PIXELS,
    IMAGE_MIN_PIXELS,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    VIDEO_TOTAL_PIXELS,
    resize_frames,
    smart_resize,
    video_frame_max_pixels,
)
from omnistream.media.video import VideoClip, decode_video, frames_from_list, select_frames, smart_nframes

VideoSource = str | os.PathLike | Sequence[ImageSource] | np.ndarray | torch.Tensor | VideoClip


def check_pixel_count(name: str, value: int | float | None, factor: int = IMAGE_FACTOR) -> None:
    """A requested min/max area (None: the default) must cover one factor x factor patch: a
    smaller cap cannot be met (smart_resize keeps every side >= factor). The CLI checks its
    --max-pixels with this before loading a model."""
    area = factor**2
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and area <= value < math.inf
    if value is not None and not ok:
        raise ConfigError(f"{name} must be a number >= {area} (one {factor}px patch), got {value}")


@dataclass(frozen=True)
class MediaConfig:
    """Preprocessing settings; the defaults are those the Qwen2.5-VL checkpoints were used with."""

    image_min_pixels: int = IMAGE_MIN_PIXELS  # smallest area of a resized image (px)
    image_max_pixels: int = IMAGE_MAX_PIXELS  # largest area of a resized image (px)
    video_min_pixels: int = VIDEO_MIN_PIXELS  # smallest area of a resized video frame (px)
    video_max_pixels: int = VIDEO_MAX_PIXELS  # largest area of a resized video frame (px)
    video_total_pixels: int = VIDEO_TOTAL_PIXELS  # pixel budget of one clip, shared by its frames
    fps: float = FPS  # default sampling rate, frames per second of video
    min_frames: int = FPS_MIN_FRAMES  # fewest frames sampled from a file in fps mode
    max_frames: int = FPS_MAX_FRAMES  # most frames of one video (any source)
    patch_size: int = 14  # side of a vision patch (px)
    temporal_patch_size: int = 2  # frames per temporal patch (Conv3d depth); equals FRAME_FACTOR
    merge_size: int = 2  # patches merged per side into one LLM token

    def __post_init__(self) -> None:
        for f in fields(self):
            value, kind = getattr(self, f.name), int if f.type == "int" else (int, float)
            valid = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
            if not valid or value <= 0:
                raise ConfigError(f"MediaConfig.{f.name} must be a positive {f.type}, got {value!r}")
        area = self.factor**2
        for lo, hi in (("image_min_pixels", "image_max_pixels"), ("video_min_pixels", "video_max_pixels")):
            if getattr(self, lo) < area or getattr(self, lo) > getattr(self, hi):
                got = f"{getattr(self, lo)}, {getattr(self, hi)}"
                raise ConfigError(f"need {area} <= {lo} <= {hi}, got {got}")
        if self.video_total_pixels < self.video_min_pixels:
            raise ConfigError("video_total_pixels must be >= video_min_pixels")
        if self.min_frames > self.max_frames or self.max_frames < FRAME_FACTOR:
            got = f"{self.min_frames}, {self.max_frames}"
            raise ConfigError(f"need 1 <= min_frames <= max_frames and max_frames >= 2, got {got}")
        if self.temporal_patch_size != FRAME_FACTOR:
            raise ConfigError(f"temporal_patch_size must be {FRAME_FACTOR} (frame counts are rounded to it)")

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this (28 px for Qwen2.5-VL)."""
        return self.patch_size * self.merge_size


class MediaProcessor:
    """Turns images and videos into `MediaItem`s. Stateless apart from its config: thread-safe."""

    def __init__(self, config: MediaConfig | None = None, *, model_key: str | None = None, pin_memory: bool = True) -> None:
        self.config = config or MediaConfig()
        self.model_key = model_key  # model identity hashed into every item; None: items are not hashed
        # page-lock rows when CUDA is there; False in an engine process's front-end: pinning
        # would open a CUDA context in the server process (the engine process pins on arrival)
        self.pin_memory = pin_memory

    def process_image(
        self, src: ImageSource, *, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> MediaItem:
        """One image (path, PIL, numpy, tensor) -> MediaItem with grid_thw (1, H/14, W/14)."""
        cfg = self.config
        lo, hi = self._pixel_bounds(min_pixels, max_pixels, cfg.image_min_pixels, cfg.image_max_pixels)
        t0 = time.perf_counter()
        rgb = load_image(src)  # (H, W, 3) uint8
        t1 = time.perf_counter()
        h, w = smart_resize(rgb.shape[0], rgb.shape[1], cfg.factor, lo, hi)
        pixel_values, grid = self._encode(rgb[None], h, w)
        return self._hash(MediaItem(
            kind="image",
            pixel_values=pixel_values,
            grid_thw=grid,
            merge_size=cfg.merge_size,
            decode_s=t1 - t0,
            preprocess_s=time.perf_counter() - t1,
        ))

    def process_video(
        self,
        src: VideoSource,
        *,
        fps: float | None = None,
        nframes: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        timestamps: Sequence[float] | None = None,
    ) -> MediaItem:
        """A video file, a list of frames (fps = their capture rate when `timestamps` is None)
        or a VideoClip -> MediaItem. `nframes` (even) overrides fps sampling; the per-frame pixel
        cap shrinks with the frame count (`video_frame_max_pixels`)."""
        cfg = self.config
        lo, hi = self._pixel_bounds(min_pixels, max_pixels, cfg.video_min_pixels, cfg.video_max_pixels)
        t0 = time.perf_counter()
        clip = self._load_clip(src, fps=fps, nframes=nframes, timestamps=timestamps)
        t1 = time.perf_counter()
        frame_max = video_frame_max_pixels(
            clip.num_frames, hi, cfg.video_total_pixels, min_pixels=lo, frame_max_pixels=cfg.video_max_pixels
        )
        h, w = smart_resize(clip.frames.shape[1], clip.frames.shape[2], cfg.factor, lo, frame_max)
        pixel_values, grid = self._encode(clip.frames, h, w)
        return self._hash(MediaItem(
            kind="video",
            pixel_values=pixel_values,
            grid_thw=grid,
            second_per_grid_t=cfg.temporal_patch_size / clip.sample_fps,
            timestamps=clip.timestamps.tolist(),
            merge_size=cfg.merge_size,
            decode_s=t1 - t0,
            preprocess_s=time.perf_counter() - t1,
        ))

    def _hash(self, item: MediaItem) -> MediaItem:
        """Content hashes, computed here once per item (never again downstream)."""
        if self.model_key is None:
            return item
        cfg = self.config
        return hash_item(item, patch_size=cfg.patch_size, temporal_patch_size=cfg.temporal_patch_size, model_key=self.model_key)

    def _load_clip(
        self, src: VideoSource, *, fps: float | None, nframes: int | None, timestamps: Sequence[float] | None
    ) -> VideoClip:
        """Decode / wrap the source and sample it; every path ends with <= max_frames frames."""
        cfg = self.config
        if isinstance(src, (str, os.PathLike)):
            if timestamps is not None:
                raise ConfigError("timestamps are only accepted with a list of frames")
            return decode_video(
                src,
                fps=cfg.fps if fps is None else fps,
                nframes=nframes,
                min_frames=cfg.min_frames,
                max_frames=cfg.max_frames,
            )
        if isinstance(src, VideoClip):
            clip = src
        elif isinstance(src, (np.ndarray, torch.Tensor)) and src.ndim == 4:  # (N, H, W, C) or (N, C, H, W)
            clip = frames_from_list(list(src), timestamps, cfg.fps if fps is None else fps)
        elif isinstance(src, (list, tuple)):
            clip = frames_from_list(src, timestamps, cfg.fps if fps is None else fps)
        else:
            raise MediaError(f"unsupported video source type {type(src).__name__}")
        if nframes is not None:
            count = smart_nframes(
                clip.num_frames, clip.source_fps, nframes=nframes, max_frames=cfg.max_frames
            )
            clip = select_frames(clip, count)
        if clip.num_frames > cfg.max_frames:
            raise MediaError(
                f"{clip.num_frames} frames exceed max_frames={cfg.max_frames}; pass nframes to subsample"
            )
        return clip

    def _pixel_bounds(
        self, min_pixels: int | None, max_pixels: int | None, default_min: int, default_max: int
    ) -> tuple[int, int]:
        """Validated (min_pixels, max_pixels) of a request. A max below the default min lowers
        the min with it (the explicit request wins); explicit contradicting values are an error."""
        for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
            check_pixel_count(name, value, self.config.factor)
        hi = default_max if max_pixels is None else max_pixels
        lo = min(default_min, hi) if min_pixels is None else min_pixels
        if lo > hi:
            raise ConfigError(f"min_pixels ({lo}) exceeds max_pixels ({hi})")
        return lo, hi

    def _encode(self, frames: np.ndarray, h: int, w: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(N, H, W, 3) uint8 -> pixel_values (gt*gh*gw, 3*T*P*P) uint8 raw and grid (gt, gh, gw).

        Rows stay uint8: the model normalises them on the device (prepare_pixels ->
        media/patchify.normalize_rows, bit-identical to normalising here). The host does one
        uint8 copy (the patch layout) instead of a float32 conversion, normalisation and a float32
        copy, and hashing, pinning and the host-to-device copy move a quarter of the bytes."""
        cfg = self.config
        resized = np.ascontiguousarray(resize_frames(frames, h, w))
        pixels = torch.from_numpy(resized).permute(0, 3, 1, 2)  # (N, 3, h, w) uint8, a view
        values, grid = patchify(pixels, cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size)
        if self.pin_memory and torch.cuda.is_available():
            # page-locked rows copy to the GPU at full PCIe speed, asynchronously (3-4x faster)
            values = values.pin_memory()
        return values, grid
