"""Deterministic synthetic workloads: generated video frames and the conversation that asks
about them, in the form `Engine.generate` takes.

Frames are generated, never decoded from files, so a benchmark runs the same on a machine
without PyAV and gives the same pixels for the same seed everywhere.
"""

from __future__ import annotations

import numpy as np

from omnistream.errors import ConfigError

FACTOR = 28  # patch 14 px * merge 2: resized sides are multiples of this
DEFAULT_QUESTION = "Describe what happens in this video, step by step."


def synthetic_video_frames(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """n frames of (size, size, 3) uint8: a fixed textured background with three coloured
    squares moving on straight paths (wrapping at the edges), so consecutive frames differ the
    way a real clip does, and different seeds give different clips."""
    if n < 1 or size < 1:
        raise ConfigError(f"need n >= 1 and size >= 1, got n={n}, size={size}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack([xx, yy, 1 - (xx + yy) / 2], axis=-1) * 160  # (S, S, 3) smooth gradient
    base += rng.normal(0, 12, (size, size, 3))  # fixed texture, like sensor noise
    side = max(2, size // 8)
    starts = rng.integers(0, size, (3, 2))  # (square, [row, col])
    speeds = rng.integers(-size // 16 - 1, size // 16 + 2, (3, 2))
    colours = rng.integers(0, 256, (3, 3))
    frames = []
    for i in range(n):
        frame = base.copy()
        for (r0, c0), (dr, dc), colour in zip(starts, speeds, colours):
            rows = (r0 + i * dr + np.arange(side)) % size
            cols = (c0 + i * dc + np.arange(side)) % size
            frame[np.ix_(rows, cols)] = colour
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
    return frames


def video_tokens(n: int, size: int) -> int:
    """LLM tokens of an n-frame size x size video (2 frames per temporal patch, 2x2 merge)."""
    return -(-n // 2) * (size // FACTOR) ** 2


def video_question(
    n: int, size: int, seed: int = 0, question: str = DEFAULT_QUESTION, fps: float = 2.0
) -> list[dict]:
    """One user message: an n-frame size x size synthetic video at `fps` + a question.

    min_pixels = max_pixels = size * size, so frames keep their size (size must be a multiple
    of 28) and the video takes exactly `video_tokens(n, size)` tokens."""
    if size % FACTOR:
        raise ConfigError(f"frame size must be a multiple of {FACTOR} px, got {size}")
    frames = synthetic_video_frames(n, size, seed)
    video = {
        "type": "video",
        "video": {"frames": frames, "timestamps": [i / fps for i in range(n)]},
        "fps": fps,
        "min_pixels": size * size,
        "max_pixels": size * size,
    }
    return [{"role": "user", "content": [video, {"type": "text", "text": question}]}]
