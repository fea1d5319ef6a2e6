"""Audio memory for live sessions: the most recent stretch of sound, in the encoder's 2 s chunks,
beside the frame memory. Pure numpy, independent of the engine.

Unit. The audio encoder attends inside each 2 s chunk (200 mel frames) and never across chunks,
so a chunk is what is featurised, hashed and encoded once. Samples arrive in pieces of any size
(`push(samples, timestamp)`, 16 kHz mono float32, timestamp of the first sample on the session's
clock) and fill the open chunk; a chunk is sealed when it holds 2 s, or early when the next piece
leaves a gap (its timestamp is past the end of the sound so far by more than `gap_tolerance_s`):
a sealed short chunk keeps its true length. A piece that starts before the end of the sound so
far (by more than the tolerance) is refused (MediaError), like a frame out of order; within the
tolerance it is taken as contiguous (the sample clock wins over jittery timestamps).

Features of a live chunk are computed over that chunk alone (not over the whole stream as an
offline clip's are: the log-mel clamp uses the clip's maximum), so a chunk's features, hash and
encoder output never change once it is sealed.

Bound. The memory holds at most `max_seconds` of sealed sound plus the open chunk. When over,
the OLDEST sealed chunk is dropped first: the Stream window of the frame memory keeps the most
recent frames for the same reason, questions about a live stream mostly ask what was just said
or heard, and nothing here scores the importance of sound (there is no Star memory for audio).
The default, 20 s, is about the Stream window's span (20 frames at the 1-2 frames per second
live cameras send: 10-20 s).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from omnistream.errors import ConfigError, MediaError
from omnistream.media.audio import AudioConfig, audio_from_array

SAMPLING_RATE = 16_000
CHUNK_SAMPLES = 2 * SAMPLING_RATE  # the encoder's unit: 2 s (200 mel frames of 10 ms)


def as_samples(samples, sampling_rate: int, config: AudioConfig | None = None) -> np.ndarray:
    """A live piece -> (n,) float32 at 16 kHz. 16 kHz pieces of any length (a 20 ms packet
    too): 1-D float in [-1, 1] or int16 PCM. Another rate goes through the clip path
    (media/audio.audio_from_array: resampled, so at least 30 ms per piece). MediaError else."""
    cfg = config or AudioConfig()
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, (int, np.integer)):
        raise MediaError(f"audio sampling_rate must be an integer (Hz), got {sampling_rate!r}")
    if int(sampling_rate) != cfg.sampling_rate:
        return audio_from_array(samples, int(sampling_rate), cfg).samples
    if hasattr(samples, "detach"):  # a torch tensor
        samples = samples.detach().cpu().numpy()
    x = np.asarray(samples)
    if x.ndim != 1:
        raise MediaError(f"live audio samples must be 1-D (mono), got shape {x.shape}")
    if x.dtype == np.int16:
        x = x.astype(np.float32) / 32768.0
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    else:
        raise MediaError(f"live audio samples must be float or int16 PCM, got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise MediaError("audio samples contain NaN or infinity")
    return x


@dataclass(frozen=True)
class AudioMemoryConfig:
    max_seconds: float = 20.0  # sealed sound kept (about the Stream window's span); oldest dropped first
    gap_tolerance_s: float = 0.05  # timestamp jitter taken as contiguous sound

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_seconds) and self.max_seconds > 0):
            raise ConfigError(f"AudioMemoryConfig.max_seconds must be > 0, got {self.max_seconds}")
        if not (math.isfinite(self.gap_tolerance_s) and 0 <= self.gap_tolerance_s < 2.0):
            raise ConfigError(f"AudioMemoryConfig.gap_tolerance_s must be in [0, 2), got {self.gap_tolerance_s}")


@dataclass(frozen=True, eq=False)
class AudioChunk:
    """Up to 2 s of contiguous sound: sealed (never changes again) or the open chunk's snapshot."""

    chunk_id: int  # monotonic over a stream; equal order to time
    start: float  # seconds of its first sample
    samples: np.ndarray  # (n,) float32 at 16 kHz, n <= CHUNK_SAMPLES; owned, not mutated
    sealed: bool = True

    @property
    def seconds(self) -> float:
        return self.samples.shape[0] / SAMPLING_RATE

    @property
    def key(self) -> tuple[int, int]:
        """Identity of its content: the open chunk's snapshot changes as samples arrive."""
        return (self.chunk_id, self.samples.shape[0])


@dataclass
class AudioMemoryStats:
    seconds_received: float = 0.0
    seconds_held: float = 0.0  # sealed chunks + the open one
    seconds_dropped: float = 0.0  # sealed chunks dropped for the bound (oldest first)
    chunks_held: int = 0
    chunks_dropped: int = 0
    gaps: int = 0  # pieces that started after a gap (the chunk before them was sealed short)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Open:
    chunk_id: int
    start: float
    pieces: list[np.ndarray] = field(default_factory=list)
    n: int = 0


class AudioMemory:
    """Not thread-safe: the live session calls it under its state lock."""

    def __init__(self, config: AudioMemoryConfig | None = None) -> None:
        self.config = config or AudioMemoryConfig()
        self._sealed: deque[AudioChunk] = deque()
        self._open: _Open | None = None
        self._next_id = 0
        self._end = -math.inf  # seconds just after the last sample (the sample clock)
        self._stats = AudioMemoryStats()

    # ------------------------------------------------------------------ intake
    def check(self, timestamp: float) -> None:
        """Raises MediaError when a piece starting at `timestamp` cannot follow the sound so far."""
        if not math.isfinite(timestamp):
            raise MediaError(f"audio timestamp {timestamp} must be finite")
        if timestamp < self._end - self.config.gap_tolerance_s:
            raise MediaError(f"audio timestamp {timestamp} is before the end of the audio so far ({self._end:.3f} s)")

    def push(self, samples: np.ndarray, timestamp: float) -> list[int]:
        """Appends a piece; returns the ids of the sealed chunks dropped for the bound."""
        self.check(timestamp)
        x = np.ascontiguousarray(samples, dtype=np.float32).reshape(-1)
        if x.shape[0] == 0:
            return []
        if self._open is not None and timestamp > self._end + self.config.gap_tolerance_s:
            self._seal()  # a gap: the chunk before it keeps its true (shorter) length
            self._stats.gaps += 1
        start = timestamp if self._open is None and timestamp > self._end + self.config.gap_tolerance_s else None
        self._stats.seconds_received += x.shape[0] / SAMPLING_RATE
        while x.shape[0]:
            if self._open is None:
                t0 = start if start is not None else self._end
                self._open, start = _Open(self._next_id, t0), None
                self._next_id += 1
            take = min(CHUNK_SAMPLES - self._open.n, x.shape[0])
            self._open.pieces.append(x[:take].copy())
            self._open.n += take
            x = x[take:]
            self._end = self._open.start + self._open.n / SAMPLING_RATE
            if self._open.n == CHUNK_SAMPLES:
                self._seal()
        return self._evict()

    def _seal(self) -> None:
        o, self._open = self._open, None
        self._sealed.append(AudioChunk(o.chunk_id, o.start, np.concatenate(o.pieces)))

    def _evict(self) -> list[int]:
        dropped = []
        while self._sealed and sum(c.seconds for c in self._sealed) > self.config.max_seconds + 1e-9:
            c = self._sealed.popleft()
            dropped.append(c.chunk_id)
            self._stats.seconds_dropped += c.seconds
            self._stats.chunks_dropped += 1
        return dropped

    # ------------------------------------------------------------------ reading
    def retained(self) -> list[AudioChunk]:
        """Sealed chunks in time order, then a snapshot of the open chunk (sealed=False)."""
        out = list(self._sealed)
        if self._open is not None and self._open.n:
            o = self._open
            out.append(AudioChunk(o.chunk_id, o.start, np.concatenate(o.pieces), sealed=False))
        return out

    def stats(self) -> AudioMemoryStats:
        held = self.retained()
        s = self._stats
        return AudioMemoryStats(s.seconds_received, sum(c.seconds for c in held), s.seconds_dropped, len(held),
                                s.chunks_dropped, s.gaps)

    def clear(self) -> None:
        self._sealed.clear()
        self._open = None
