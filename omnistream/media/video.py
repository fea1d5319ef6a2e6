"""Decode and sample a video into a `VideoClip`: PyAV decoding with qwen-vl-utils' frame rules.

Data flow: probe the stream (frame rate, announced frame count) -> choose nframes and the frame
indices from the count -> one sequential decode pass that converts only the wanted frames to RGB
-> if the pass decoded a different number of frames than announced (truncated or mislabelled
files), choose again from the true count and decode once more.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from omnistream.media.pyav import av, check_media_file, decoded_frames
import numpy as np

from omnistream.errors import ConfigError, MediaError, one_line
from omnistream.media.image import MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE, ImageSource, load_image
from omnistream.media.resize import (
    FPS,
    FPS_MAX_FRAMES,
    FPS_MIN_FRAMES,
    FRAME_FACTOR,
    ceil_by_factor,
    floor_by_factor,
    round_by_factor,
)

logger = logging.getLogger(__name__)

# One decoded frame: ((H, W, 3) uint8 RGB, seconds from the stream start or None without pts).
_Decoded = tuple[np.ndarray, float | None]


@dataclass
class VideoClip:
    """Sampled RGB frames of one video with their times."""

    frames: np.ndarray  # (N, H, W, 3) uint8 RGB
    timestamps: np.ndarray  # (N,) float64 seconds from the start of the stream, non-decreasing
    sample_fps: float  # sampled frames per second of video: N / total_frames * source_fps
    source_fps: float  # average frame rate of the source
    duration_s: float  # seconds the sampling covered: total_frames / source_fps

    def __post_init__(self) -> None:
        assert self.frames.ndim == 4 and self.frames.shape[-1] == 3, self.frames.shape
        assert self.frames.dtype == np.uint8, self.frames.dtype
        assert self.timestamps.shape == (self.frames.shape[0],), self.timestamps.shape

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]


def smart_nframes(
    total_frames: int,
    source_fps: float,
    *,
    fps: float | None = FPS,
    nframes: int | None = None,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int = FPS_MAX_FRAMES,
) -> int:
    """How many of `total_frames` to sample (qwen-vl-utils' `smart_nframes`).

    - fps mode: duration * fps, clamped to [min_frames, min(max_frames, total_frames)] and
      rounded down to an even count (a temporal patch is 2 frames).
    - explicit `nframes` (wins over fps): rounded to the nearest even count with Python's round
      (5 -> 4, 7 -> 8, as qwen-vl-utils does); below 2 or above max_frames it is an error. A
      count above the frames the video has is clamped down to its largest even count, where
      qwen-vl-utils raises: a client cannot know the count in advance.
    - a video of a single frame gives 1 (qwen-vl-utils raises); patchify repeats it to 2.
    """
    if total_frames < 1:
        raise MediaError("video has no frames")
    if nframes is not None:
        count = round_by_factor(nframes, FRAME_FACTOR)
        if count < FRAME_FACTOR or count > max_frames:
            raise ConfigError(f"nframes must round to an even count in [2, {max_frames}], got {nframes}")
        return max(1, min(count, floor_by_factor(total_frames, FRAME_FACTOR)))
    if total_frames == 1:
        return 1
    if fps is None or not fps > 0 or not math.isfinite(fps):
        raise ConfigError(f"sampling fps must be a positive number, got {fps}")
    lo = ceil_by_factor(min_frames, FRAME_FACTOR)
    hi = floor_by_factor(min(max_frames, total_frames), FRAME_FACTOR)
    count = min(min(max(total_frames / source_fps * fps, lo), hi), total_frames)
    return floor_by_factor(count, FRAME_FACTOR)


def frame_range(
    total_frames: int, source_fps: float, start_s: float | None, end_s: float | None
) -> tuple[int, int]:
    """First and last frame index (inclusive) inside [start_s, end_s] (qwen-vl-utils'
    `calculate_video_frame_range`: start rounds up, end rounds down, both clamped)."""
    max_duration = total_frames / source_fps
    first = 0 if start_s is None else math.ceil(max(0.0, min(start_s, max_duration)) * source_fps)
    last = total_frames - 1
    if end_s is not None:
        last = min(math.floor(max(0.0, min(end_s, max_duration)) * source_fps), total_frames - 1)
    if first > last or (first == last and total_frames > 1):
        raise MediaError(
            f"time range [{start_s}, {end_s}] s of a {max_duration:.3f} s video holds fewer than 2 frames"
        )
    return first, last


def decode_video(
    path: str | os.PathLike,
    *,
    fps: float | None = FPS,
    nframes: int | None = None,
    min_frames: int = FPS_MIN_FRAMES,
    max_frames: int = FPS_MAX_FRAMES,
    start_s: float | None = None,
    end_s: float | None = None,
) -> VideoClip:
    """Decode `path` and sample frames the way qwen-vl-utils does (see `smart_nframes`).

    Frame indices are `linspace(first, last, nframes).round()` over the decodable frames of
    [start_s, end_s]; sample_fps = nframes / total_frames * source_fps. A truncated file keeps
    the frames that decode; a file with none raises MediaError. fps=None means the default 2.0.
    """
    fps = FPS if fps is None else fps
    _check_sampling_args(fps, nframes, min_frames, max_frames, start_s, end_s)
    path = check_media_file(Path(path), "video")
    source_fps, announced = _probe(path)
    sampling = _Sampling(source_fps, fps, nframes, min_frames, max_frames, start_s, end_s)
    indices = sampling.indices(announced)
    kept, decoded = _decode_pass(path, indices, stop_after=indices[-1] if end_s is not None else None)
    if decoded == 0:
        raise MediaError(f"no decodable video frames in {path}")
    reached_end = end_s is None or decoded <= indices[-1]
    if reached_end and decoded != announced:
        logger.warning("%s: %d frames announced, %d decoded; resampling", path, announced, decoded)
        announced = decoded
        indices = sampling.indices(decoded)
        kept, _ = _decode_pass(path, indices, stop_after=indices[-1])
    return sampling.clip(kept, indices, announced)


def _check_sampling_args(
    fps: float,
    nframes: int | None,
    min_frames: int,
    max_frames: int,
    start_s: float | None,
    end_s: float | None,
) -> None:
    """Reject impossible requests before touching the file (ConfigError)."""
    if min_frames < 1 or max_frames < FRAME_FACTOR:
        raise ConfigError(f"need min_frames >= 1 and max_frames >= 2, got {min_frames}, {max_frames}")
    if nframes is None and (not fps > 0 or not math.isfinite(fps)):
        raise ConfigError(f"sampling fps must be a positive number, got {fps}")
    if nframes is not None:
        smart_nframes(max_frames, 1.0, nframes=nframes, max_frames=max_frames)  # range check only
    for name, value in (("start_s", start_s), ("end_s", end_s)):
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number of seconds, got {value}")
    if start_s is not None and end_s is not None and end_s <= start_s:
        raise ConfigError(f"end_s ({end_s}) must be after start_s ({start_s})")


@dataclass
class _Sampling:
    """The request's sampling parameters, applied to a frame count."""

    source_fps: float
    fps: float
    nframes: int | None
    min_frames: int
    max_frames: int
    start_s: float | None
    end_s: float | None

    def indices(self, total_frames: int) -> np.ndarray:
        """(nframes,) int64 frame indices to keep, ascending."""
        first, last = frame_range(max(total_frames, 1), self.source_fps, self.start_s, self.end_s)
        count = smart_nframes(
            last - first + 1,
            self.source_fps,
            fps=self.fps,
            nframes=self.nframes,
            min_frames=self.min_frames,
            max_frames=self.max_frames,
        )
        return np.linspace(first, last, count).round().astype(np.int64)

    def clip(self, kept: dict[int, _Decoded], indices: np.ndarray, total: int) -> VideoClip:
        """Assemble the clip from the decoded frames of `indices` out of `total` frames."""
        first, last = frame_range(total, self.source_fps, self.start_s, self.end_s)
        if any(int(i) not in kept for i in indices):
            raise MediaError("video decoded differently on a second pass (corrupt stream)")
        frames = np.stack([kept[int(i)][0] for i in indices])  # (N, H, W, 3)
        times = [kept[int(i)][1] for i in indices]
        fallback = indices / self.source_fps  # when pts are missing or not monotonic
        stamps = np.asarray(times, dtype=np.float64) if None not in times else fallback
        if np.any(np.diff(stamps) < 0):
            stamps = fallback
        in_range = last - first + 1
        return VideoClip(
            frames=frames,
            timestamps=stamps.astype(np.float64),
            sample_fps=len(indices) / max(in_range, 1) * self.source_fps,
            source_fps=self.source_fps,
            duration_s=in_range / self.source_fps,
        )


def _open(path: Path) -> av.container.InputContainer:
    try:
        return av.open(str(path), "r")
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise MediaError(f"not a readable media file: {path} ({one_line(exc)})") from None


def _video_stream(container: av.container.InputContainer, path: Path) -> av.VideoStream:
    if not container.streams.video:
        kinds = ", ".join(s.type for s in container.streams) or "none"
        raise MediaError(f"no video stream in {path} (streams: {kinds})")
    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    if max(width, height) > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
        raise MediaError(f"video frames too large ({width}x{height}): {path}")
    return stream


def _probe(path: Path) -> tuple[float, int]:
    """(average frame rate, announced frame count) from the headers; the count falls back to
    counting packets (demux only, no decoding) when the container does not store it."""
    with _open(path) as container:
        stream = _video_stream(container, path)
        source_fps = _stream_fps(stream, path)
        if stream.frames > 0:
            return source_fps, stream.frames
        try:
            count = sum(1 for packet in container.demux(stream) if packet.size > 0)
        except av.FFmpegError:
            count = 0
        if count == 0 and stream.duration and stream.time_base:
            count = round(float(stream.duration * stream.time_base) * source_fps)
        return source_fps, max(count, 1)


def _stream_fps(stream: av.VideoStream, path: Path) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0 and math.isfinite(float(rate)):
            return float(rate)
    raise MediaError(f"cannot determine the frame rate of {path}")


def _decode_pass(
    path: Path, indices: np.ndarray, *, stop_after: int | None
) -> tuple[dict[int, _Decoded], int]:
    """Decode frames in order, converting only `indices` to RGB; stop after index `stop_after`
    (None: decode to the end). Returns {index: ((H, W, 3) uint8, seconds)} and the number of
    frames decoded. Frames whose size changes mid-stream are scaled to the first frame's size."""
    try:
        return _decode_frames(path, set(indices.tolist()), stop_after)
    except (av.FFmpegError, ValueError, OSError) as exc:  # errors outside packet decoding
        raise MediaError(f"cannot decode {path}: {one_line(exc)}") from None


def _decode_frames(
    path: Path, wanted: set[int], stop_after: int | None
) -> tuple[dict[int, _Decoded], int]:
    kept: dict[int, _Decoded] = {}
    count = 0
    with _open(path) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"  # frame + slice threads; decode order is preserved
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else None
        size: tuple[int, int] | None = None
        for frame in decoded_frames(container, stream):
            size = size or (frame.width, frame.height)
            start = frame.time if start is None else start  # no stream start: the first frame
            if count in wanted:
                rgb = frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
                kept[count] = (rgb, None if frame.time is None or start is None else frame.time - start)
            count += 1
            if stop_after is not None and count > stop_after:
                break
    return kept, count


def frames_from_list(
    frames: Sequence[ImageSource],
    timestamps: Sequence[float] | None = None,
    fps: float = FPS,
) -> VideoClip:
    """A clip from frames given one by one (PIL, numpy, tensors or image paths), all one size.

    Without `timestamps` the frames are `fps` apart. With them (seconds, non-decreasing, may be
    irregular) sample_fps is the mean rate (N - 1) / (last - first), the single rate that
    M-RoPE's second_per_grid_t can express.
    """
    if len(frames) == 0:
        raise MediaError("frame list is empty")
    if not fps > 0 or not math.isfinite(fps):
        raise ConfigError(f"fps must be a positive number, got {fps}")
    arrays = [load_image(f) for f in frames]
    if len({a.shape for a in arrays}) > 1:
        raise MediaError(f"frames differ in size: {sorted({a.shape[:2] for a in arrays})}")
    stamps = _list_timestamps(len(arrays), timestamps, fps)
    span = stamps[-1] - stamps[0]
    rate = (len(arrays) - 1) / span if span > 0 else fps
    return VideoClip(
        frames=np.stack(arrays),
        timestamps=stamps,
        sample_fps=rate,
        source_fps=rate,
        duration_s=len(arrays) / rate,
    )


def _list_timestamps(n: int, timestamps: Sequence[float] | None, fps: float) -> np.ndarray:
    if timestamps is None:
        return np.arange(n, dtype=np.float64) / fps
    stamps = np.asarray(timestamps, dtype=np.float64)
    if stamps.shape != (n,):
        raise MediaError(f"{len(timestamps)} timestamps for {n} frames")
    if not np.isfinite(stamps).all() or np.any(np.diff(stamps) < 0):
        raise MediaError("timestamps must be finite and non-decreasing")
    return stamps


def select_frames(clip: VideoClip, nframes: int) -> VideoClip:
    """Keep `nframes` of the clip's frames, evenly spaced (same linspace rule as decoding)."""
    if nframes >= clip.num_frames:
        return clip
    idx = np.linspace(0, clip.num_frames - 1, nframes).round().astype(np.int64)
    return VideoClip(
        frames=clip.frames[idx],
        timestamps=clip.timestamps[idx],
        sample_fps=nframes / clip.num_frames * clip.sample_fps,
        source_fps=clip.source_fps,
        duration_s=clip.duration_s,
    )

