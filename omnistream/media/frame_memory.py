"""Frame memory for live video: a Stream window of the most recent temporal patches and a Star
memory of important ones (the seed's SmartFrameManager, done in temporal patches). Pure numpy,
independent of the engine.

Unit. Memory works in temporal patches, two consecutive frames: the unit the vision tower encodes
(its Conv3d mixes each frame pair and attention never crosses patches), so a retained patch keeps
its vision embeddings and is never re-encoded. Capacities are given in frames, as in the seed, and
held as capacity // 2 patches (at least 1). `FramePairer` turns single frames into patches.

Policy, for each new patch p (patches arrive in time order):
  1. Feature. `p.feature` is a cheap descriptor computed once from the pixels (no model) on a
     strided grid of at most ~64x64 pixels: a feature_size^2 grayscale thumbnail and a per-channel
     colour histogram, both averaged over the two frames and scaled so that the L1 distance
     d(a, b) of two features lies in [0, 1] (half the mean absolute thumbnail difference, half
     the histogram total variation).
  2. Near-duplicates. If d(p, last retained patch) < dedupe_threshold, p is dropped and counted.
     A static scene keeps one patch until it drifts past the threshold.
  3. Importance (novelty). change = s(d(p, previous retained patch)) is the scene-change score
     (1 for the first patch); novelty = s(min over Star of d(p, star patch)) (1 while Star is
     empty); s(d) = 1 - exp(-d / novelty_scale) maps distances into [0, 1);
     importance = change * novelty: both must be high. A cut to new content scores high; motion
     inside a scene, and a cut back to a scene Star already holds, score low.
  4. Stream. p enters the Stream window. When the window is over capacity its oldest patch q
     leaves. q's importance is re-scored against Star as it is now (Star may have gained a patch
     of the same scene since q arrived) and q is promoted to Star if importance >= threshold.
  5. Star. When Star is full, q enters only if it is more important than the least important Star
     patch, which is evicted (ties: the oldest); otherwise q is discarded.
Star patches are all older than Stream patches (they come from the Stream's tail), so `retained()`
is Star then Stream, in time order, each patch once. `add_patch` returns an `AddResult` naming the
patches that left memory, so the engine can free their KV and encoder-cache entries.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace

import numpy as np

from omnistream.errors import ConfigError, MediaError

FRAMES_PER_PATCH = 2  # Qwen2.5-VL temporal_patch_size
_SAMPLE_SIDE = 64  # features read a strided grid of at most ~64x64 pixels per frame
_GRAY = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601 luma weights


@dataclass(frozen=True)
class FrameMemoryConfig:
    star_capacity: int = 20  # frames kept in Star memory (held as capacity // 2 patches, >= 1)
    stream_capacity: int = 20  # frames in the Stream window of recent patches (same rounding)
    importance_threshold: float = 0.6  # a patch leaving the Stream enters Star at this importance
    dedupe_threshold: float = 0.02  # feature distance (in [0, 1]) under which a patch is a duplicate
    novelty_scale: float = 0.1  # feature distance scoring 1 - 1/e ~ 0.63 in change and novelty
    feature_size: int = 16  # side of the grayscale thumbnail in the patch feature
    hist_bins: int = 8  # colour histogram bins per RGB channel in the patch feature

    def __post_init__(self) -> None:
        if self.star_capacity < 1 or self.stream_capacity < 1:
            raise ConfigError("star_capacity and stream_capacity must be >= 1 frame")
        if not 0.0 <= self.importance_threshold <= 1.0:
            raise ConfigError(f"importance_threshold must be in [0, 1], got {self.importance_threshold}")
        if not 0.0 <= self.dedupe_threshold < 1.0:
            raise ConfigError(f"dedupe_threshold must be in [0, 1), got {self.dedupe_threshold}")
        if self.novelty_scale <= 0.0:
            raise ConfigError(f"novelty_scale must be > 0, got {self.novelty_scale}")
        if self.feature_size < 1 or not 1 <= self.hist_bins <= 256:
            raise ConfigError("feature_size must be >= 1 and hist_bins in [1, 256]")

    @property
    def star_patches(self) -> int:
        return max(1, self.star_capacity // FRAMES_PER_PATCH)

    @property
    def stream_patches(self) -> int:
        return max(1, self.stream_capacity // FRAMES_PER_PATCH)

    @property
    def feature_dim(self) -> int:
        return self.feature_size**2 + 3 * self.hist_bins


@dataclass(frozen=True, eq=False)
class TemporalPatch:
    """Two consecutive frames, already resized to the session's size, with their feature."""

    patch_id: int  # monotonic over a stream; equal order to time
    frames: tuple[np.ndarray, np.ndarray]  # 2 x (H, W, 3) uint8; owned by the patch, not mutated
    timestamps: tuple[float, float]  # seconds, non-decreasing
    feature: np.ndarray  # (feature_dim,) float32, see patch_feature
    importance: float = 0.0  # in [0, 1]; set by FrameMemory (add time, then at promotion)

    @classmethod
    def from_frames(
        cls, patch_id: int, frames: tuple[np.ndarray, np.ndarray], timestamps: tuple[float, float],
        config: FrameMemoryConfig,
    ) -> TemporalPatch:
        """Validate the frames and compute the feature once. Frames are not copied."""
        if len(frames) != FRAMES_PER_PATCH or len(timestamps) != FRAMES_PER_PATCH:
            raise MediaError("a temporal patch holds exactly 2 frames and 2 timestamps")
        for frame in frames:
            _check_frame(frame, frames[0].shape)
        t0, t1 = float(timestamps[0]), float(timestamps[1])
        if not (math.isfinite(t0) and math.isfinite(t1) and t0 <= t1):
            raise MediaError(f"timestamps must be finite and non-decreasing, got {timestamps}")
        feature = patch_feature(np.stack(frames), config.feature_size, config.hist_bins)
        return cls(patch_id, (frames[0], frames[1]), (t0, t1), feature)

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.frames) + self.feature.nbytes


@dataclass(frozen=True)
class AddResult:
    """What `FrameMemory.add_patch` did with one patch."""

    patch_id: int  # the patch added
    importance: float  # its add-time importance (0 when dropped)
    dropped_duplicate: bool  # near-duplicate of the previous retained patch: not stored
    left_stream: int | None = None  # patch pushed out of the Stream window by this one
    promoted: bool = False  # left_stream entered Star
    evicted_star: int | None = None  # Star patch evicted to make room for left_stream

    @property
    def removed(self) -> tuple[int, ...]:
        """Patch ids no longer retained anywhere after this call (free their caches)."""
        gone = [] if self.left_stream is None or self.promoted else [self.left_stream]
        return tuple(gone + ([] if self.evicted_star is None else [self.evicted_star]))


@dataclass(frozen=True)
class FrameMemoryStats:
    frames_added: int  # frames given to add_patch (2 per patch)
    patches_added: int  # patches given to add_patch
    duplicates_dropped: int  # patches dropped as near-duplicates
    patches_discarded: int  # patches that left memory (not promoted, or evicted from Star)
    star_size: int  # frames in Star
    stream_size: int  # frames in the Stream window
    unique_frames: int  # frames retained (Star and Stream never share a patch)
    compression_ratio: float  # frames_added / unique_frames (1.0 before any frame)


def patch_feature(frames: np.ndarray, feature_size: int, hist_bins: int) -> np.ndarray:
    """frames (T, H, W, 3) uint8 -> (feature_size^2 + 3 * hist_bins,) float32 whose L1 distance
    to another feature is 0.5 * mean |thumbnail diff| + 0.5 * mean channel total variation."""
    step = max(1, max(frames.shape[1:3]) // _SAMPLE_SIDE)
    grid = frames[:, ::step, ::step]  # (T, h, w, 3), h and w <= ~64: cost independent of size
    gray = (grid.astype(np.float32) @ _GRAY) / 255.0  # (T, h, w) in [0, 1]
    thumb = _area_resize(_area_resize(gray, feature_size, 1), feature_size, 2).mean(0)  # (F, F)
    hist = _colour_histogram(grid, hist_bins)  # (3 * B,), each channel sums to 1
    thumb_part = thumb.ravel() * (0.5 / feature_size**2)
    hist_part = hist * (0.5 / 6.0)  # TV per channel = 0.5 * L1; mean over 3 channels
    return np.concatenate([thumb_part, hist_part]).astype(np.float32)


def _area_resize(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Mean over `size` near-equal bins of `axis` (nearest sampling when the axis is shorter)."""
    n = x.shape[axis]
    if n < size:
        return np.take(x, (np.arange(size) * n) // size, axis=axis)
    starts = (np.arange(size) * n + size - 1) // size  # ceil(i * n / size), strictly increasing
    counts = np.diff(np.append(starts, n)).astype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = size
    return np.add.reduceat(x, starts, axis=axis) / counts.reshape(shape)


def _colour_histogram(frames: np.ndarray, bins: int) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (3 * bins,) per-channel histograms, each summing to 1."""
    idx = (frames.astype(np.int32) * bins) >> 8  # (T, H, W, 3) in [0, bins)
    idx += np.arange(3, dtype=np.int32) * bins  # channel c uses bins [c * B, (c + 1) * B)
    counts = np.bincount(idx.ravel(), minlength=3 * bins).astype(np.float32)
    return counts / (idx.size // 3)


def _check_frame(frame: np.ndarray, shape: tuple[int, ...]) -> None:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
        raise MediaError("frames must be uint8 numpy arrays (resize and convert before the memory)")
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.shape != shape:
        raise MediaError(f"frames must be (H, W, 3) of one size, got {frame.shape} and {shape}")


class FramePairer:
    """Groups single frames into temporal patches: `push` returns a patch every second frame."""

    def __init__(self, config: FrameMemoryConfig, first_patch_id: int = 0) -> None:
        self.config = config
        self._next_id = first_patch_id
        self._pending: tuple[np.ndarray, float] | None = None  # first frame of the next patch
        self._shape: tuple[int, ...] | None = None  # frame shape fixed by the first frame
        self._last_ts = -math.inf

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def push(self, frame: np.ndarray, timestamp: float) -> TemporalPatch | None:
        """frame (H, W, 3) uint8 at `timestamp` seconds (non-decreasing); copied."""
        _check_frame(frame, self._shape or frame.shape)
        timestamp = float(timestamp)
        if not timestamp >= self._last_ts:  # also rejects NaN
            raise MediaError(f"timestamp {timestamp} is before the previous one ({self._last_ts})")
        self._shape, self._last_ts = frame.shape, timestamp
        if self._pending is None:
            self._pending = (frame.copy(), timestamp)
            return None
        (first, t0), self._pending = self._pending, None
        return self._emit((first, frame.copy()), (t0, timestamp))

    def pending_frame(self) -> tuple[np.ndarray, float] | None:
        """The first frame of the next patch (waiting for its pair), with its timestamp."""
        return self._pending

    def padded_patch(self) -> TemporalPatch | None:
        """The half-filled patch closed by repeating its frame (as Qwen pads odd frame counts),
        under the id its real patch will get; the pairer keeps waiting for the pair."""
        if self._pending is None:
            return None
        frame, ts = self._pending
        return TemporalPatch.from_frames(self._next_id, (frame, frame), (ts, ts), self.config)

    def flush(self) -> TemporalPatch | None:
        """Close a half-filled patch by repeating its frame (as Qwen pads odd frame counts)."""
        if self._pending is None:
            return None
        (frame, ts), self._pending = self._pending, None
        return self._emit((frame, frame), (ts, ts))

    def _emit(self, frames: tuple[np.ndarray, np.ndarray], timestamps: tuple[float, float]) -> TemporalPatch:
        patch = TemporalPatch.from_frames(self._next_id, frames, timestamps, self.config)
        self._next_id += 1
        return patch


class FrameMemory:
    """Star memory + Stream window over temporal patches; see the module docstring for the policy."""

    def __init__(self, config: FrameMemoryConfig | None = None) -> None:
        self.config = config or FrameMemoryConfig()
        self._stream: deque[tuple[TemporalPatch, float]] = deque()  # (patch, change score), oldest first
        self._star: list[TemporalPatch] = []  # time order
        self._star_features = np.zeros((0, self.config.feature_dim), np.float32)  # (K, D)
        self._last: TemporalPatch | None = None  # previous retained patch (newest in Stream)
        self._patches_added = 0
        self._duplicates = 0
        self._discarded = 0

    @property
    def star(self) -> tuple[TemporalPatch, ...]:
        return tuple(self._star)

    @property
    def stream(self) -> tuple[TemporalPatch, ...]:
        return tuple(p for p, _ in self._stream)

    def retained(self) -> list[TemporalPatch]:
        """Star then Stream patches: time order, each patch once."""
        return self._star + [p for p, _ in self._stream]

    def add_patch(self, patch: TemporalPatch) -> AddResult:
        """Add the next patch of the stream (ids and times increasing); see the module policy."""
        self._check_order(patch)
        self._patches_added += 1
        distance = 1.0 if self._last is None else _dist(patch.feature, self._last.feature)
        if self._last is not None and distance < self.config.dedupe_threshold:
            self._duplicates += 1
            return AddResult(patch.patch_id, 0.0, dropped_duplicate=True)
        change = 1.0 if self._last is None else self._score(distance)
        patch = replace(patch, importance=self._importance(change, patch.feature))
        self._stream.append((patch, change))
        self._last = patch
        if len(self._stream) <= self.config.stream_patches:
            return AddResult(patch.patch_id, patch.importance, dropped_duplicate=False)
        old, promoted, evicted = self._leave_stream()
        return AddResult(patch.patch_id, patch.importance, False, old, promoted, evicted)

    def stats(self) -> FrameMemoryStats:
        star, stream = FRAMES_PER_PATCH * len(self._star), FRAMES_PER_PATCH * len(self._stream)
        frames = FRAMES_PER_PATCH * self._patches_added
        unique = star + stream
        return FrameMemoryStats(
            frames_added=frames, patches_added=self._patches_added, duplicates_dropped=self._duplicates,
            patches_discarded=self._discarded, star_size=star, stream_size=stream, unique_frames=unique,
            compression_ratio=frames / unique if unique else 1.0,
        )

    def nbytes(self) -> int:
        """Bytes of frames and features held (the memory's footprint, bounded by the capacities)."""
        return sum(p.nbytes for p in self.retained()) + self._star_features.nbytes

    def _check_order(self, patch: TemporalPatch) -> None:
        dim, last = self.config.feature_dim, self._last
        if patch.feature.shape != (dim,):
            raise MediaError(f"patch feature has shape {patch.feature.shape}, this memory uses ({dim},)")
        if last is not None and (patch.patch_id <= last.patch_id or patch.timestamps[0] < last.timestamps[1]):
            raise MediaError(f"patch {patch.patch_id} is not after patch {last.patch_id} (id and time)")

    def _leave_stream(self) -> tuple[int, bool, int | None]:
        """Pop the oldest Stream patch, re-score it against Star as it is now and offer it to Star;
        (its id, promoted, evicted Star id)."""
        old, change = self._stream.popleft()
        promoted, evicted = self._offer_star(replace(old, importance=self._importance(change, old.feature)))
        self._discarded += (not promoted) + (evicted is not None)
        return old.patch_id, promoted, evicted

    def _score(self, distance: float) -> float:
        return 1.0 - math.exp(-distance / self.config.novelty_scale)

    def _importance(self, change: float, feature: np.ndarray) -> float:
        """Scene-change score * novelty against Star, in [0, 1]."""
        if len(self._star) == 0:
            return change
        nearest = float(np.abs(self._star_features - feature).sum(axis=1).min())  # (K, D) -> scalar
        return change * self._score(nearest)

    def _offer_star(self, patch: TemporalPatch) -> tuple[bool, int | None]:
        """Promote `patch` (just out of the Stream) if important enough; (promoted, evicted id)."""
        if patch.importance < self.config.importance_threshold:
            return False, None
        evicted = None
        if len(self._star) >= self.config.star_patches:
            weakest = int(np.argmin([p.importance for p in self._star]))  # first = oldest on ties
            if patch.importance <= self._star[weakest].importance:
                return False, None
            evicted = self._star.pop(weakest).patch_id
        self._star.append(patch)  # newer than every Star patch: time order kept
        self._star_features = np.stack([p.feature for p in self._star])
        return True, evicted


def _dist(a: np.ndarray, b: np.ndarray) -> float:
    """L1 distance of two patch features, in [0, 1]."""
    return float(np.abs(a - b).sum())
