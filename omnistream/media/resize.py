"""Resolution rules of Qwen2.5-VL: `smart_resize`, the per-frame pixel budget of videos, and the
bicubic resize itself.

The constants and rules are those of qwen-vl-utils (the preprocessing the checkpoints were
trained and evaluated with); see /work/shared/docs/qwen-reference.md, "Video preprocessing".
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from omnistream.errors import MediaError

# Spatial factor: patch 14 x merge 2. Every resized side is a multiple of it.
IMAGE_FACTOR = 28
# Image bounds of the Qwen2.5-VL processor config (4 to 16384 merged tokens).
IMAGE_MIN_PIXELS = 3136
IMAGE_MAX_PIXELS = 12845056
# Video bounds per frame (128 to 768 merged tokens per frame) and over the whole clip.
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)
# Frame sampling: counts are multiples of FRAME_FACTOR (the temporal patch), at FPS by default.
FRAME_FACTOR = 2
FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
# smart_resize refuses images whose long side exceeds MAX_RATIO times the short side.
MAX_RATIO = 200


def round_by_factor(number: float, factor: int) -> int:
    """Closest multiple of `factor` (Python's round: halves go to the even quotient)."""
    return round(number / factor) * factor


def ceil_by_factor(number: float, factor: int) -> int:
    """Smallest multiple of `factor` >= number."""
    return math.ceil(number / factor) * factor


def floor_by_factor(number: float, factor: int) -> int:
    """Largest multiple of `factor` <= number."""
    return math.floor(number / factor) * factor


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: float = IMAGE_MIN_PIXELS,
    max_pixels: float = IMAGE_MAX_PIXELS,
) -> tuple[int, int]:
    """(h, w) closest to (height, width) with both sides multiples of `factor`, keeping the
    aspect ratio, with min_pixels <= h * w <= max_pixels where the factor grid allows it.

    qwen-vl-utils' version (sides first rounded to the nearest multiple, never below `factor`;
    then scaled down with floor or up with ceil), plus transformers' guard that keeps the
    scaled-down sides >= `factor` (qwen-vl-utils could return 0 there). For sides >= 15 px the
    result equals transformers' `smart_resize` exactly.
    """
    if height <= 0 or width <= 0:
        raise MediaError(f"image size must be positive, got {height}x{width}")
    if not 0 <= min_pixels <= max_pixels or max_pixels <= 0:
        # unchecked, a zero or negative cap fails in sqrt or yields an image of any size
        raise MediaError(f"need 0 <= min_pixels <= max_pixels and max_pixels > 0, got {min_pixels}, {max_pixels}")
    if max(height, width) / min(height, width) > MAX_RATIO:
        ratio = max(height, width) / min(height, width)
        raise MediaError(f"absolute aspect ratio must be smaller than {MAX_RATIO}, got {ratio:.1f}")
    h_bar = max(factor, round_by_factor(height, factor))
    w_bar = max(factor, round_by_factor(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, floor_by_factor(height / beta, factor))
        w_bar = max(factor, floor_by_factor(width / beta, factor))
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = ceil_by_factor(height * beta, factor)
        w_bar = ceil_by_factor(width * beta, factor)
    return h_bar, w_bar


def video_frame_max_pixels(
    nframes: int,
    max_pixels: float | None = None,
    total_pixels: float = VIDEO_TOTAL_PIXELS,
    *,
    min_pixels: float = VIDEO_MIN_PIXELS,
    frame_max_pixels: float = VIDEO_MAX_PIXELS,
) -> float:
    """Per-frame pixel cap for a video of `nframes` sampled frames (qwen-vl-utils rule).

    The clip shares `total_pixels` over its nframes / 2 temporal patches, each frame is capped at
    `frame_max_pixels`, and the cap never drops below 1.05 * min_pixels (so long videos still get
    min_pixels per frame). A caller's `max_pixels` can only lower the cap, never raise it.
    """
    if nframes <= 0:
        raise MediaError(f"a video needs at least one frame, got {nframes}")
    cap = max(min(frame_max_pixels, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
    return cap if max_pixels is None else min(max_pixels, cap)


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, height, width, 3) uint8 with PIL bicubic.

    PIL bicubic on uint8 is what transformers' PIL image processor and qwen-vl-utils' image path
    do, so images match the reference bit for bit. Frames already at the size are not touched.
    """
    assert frames.ndim == 4 and frames.shape[-1] == 3 and frames.dtype == np.uint8, frames.shape
    if frames.shape[1:3] == (height, width):
        return frames
    out = np.empty((frames.shape[0], height, width, 3), dtype=np.uint8)
    for i, frame in enumerate(frames):  # one PIL call per frame; PIL has no batched resize
        out[i] = np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC))
    return out
