"""Voice activity detection (opt-in, LOSSY): drop the silent stretches of a clip before it is
encoded, so that silence costs no audio tokens.

    {"type": "audio", "audio": "meeting.wav", "vad": true}

The clip is decoded as usual (media/audio.py), Silero VAD (the `silero-vad` package, whose
TorchScript model ships inside the wheel: nothing is downloaded) finds the speech segments, and
only those samples are kept, in order, joined end to end. What is dropped is gone: the model no
longer hears the silence, nor anything the VAD took for silence (music, an alarm, a door), and the
kept audio's timeline is compressed, so `use_audio_in_video` (audio and frames on one clock)
refuses it. The result reports the seconds and audio tokens kept and saved; `omnistream bench
audio` measures the answer's agreement with the exact path.

Install: `pip install 'omnistream[vad]'` (silero-vad needs only torch and packaging).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from omnistream.errors import ConfigError, MediaError, UserInputError
from omnistream.media.audio import AudioClip, AudioConfig, audio_from_array, decode_audio, num_mel_frames
from omnistream.media.item import audio_chunk_tokens

log = logging.getLogger(__name__)

VAD_RATE = 16_000  # Silero's rate; the clip is already at 16 kHz (AudioConfig's)


@dataclass(frozen=True)
class VadConfig:
    """Silero's knobs (its defaults, but for a longer pad: words are not clipped at the edges)."""

    threshold: float = 0.5  # speech probability above which a 32 ms window is speech
    min_speech_ms: int = 250  # shorter bursts are dropped
    min_silence_ms: int = 300  # shorter pauses stay (they are part of speech)
    speech_pad_ms: int = 100  # kept on each side of every segment

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"VadConfig.threshold must be in (0, 1), got {self.threshold!r}")
        for name in ("min_speech_ms", "min_silence_ms", "speech_pad_ms"):
            if getattr(self, name) < 0:
                raise ConfigError(f"VadConfig.{name} must be >= 0, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class VadResult:
    """The speech of a clip and what dropping the rest saved."""

    samples: np.ndarray  # (kept,) float32 at 16 kHz: the speech segments, joined
    segments: list[tuple[int, int]]  # [start, end) sample ranges of the source that were kept
    input_samples: int
    audio_tokens_before: int  # the clip's audio tokens on the exact path
    audio_tokens_after: int

    @property
    def seconds_before(self) -> float:
        return self.input_samples / VAD_RATE

    @property
    def seconds_after(self) -> float:
        return self.samples.shape[0] / VAD_RATE

    @property
    def tokens_saved(self) -> int:
        return self.audio_tokens_before - self.audio_tokens_after

    def summary(self) -> str:
        return (f"VAD (lossy): kept {self.seconds_after:.1f} of {self.seconds_before:.1f} s in {len(self.segments)} "
                f"segments; audio tokens {self.audio_tokens_before} -> {self.audio_tokens_after} (saved {self.tokens_saved})")


def audio_tokens(num_samples: int, config: AudioConfig | None = None) -> int:
    """LLM tokens of a clip of num_samples at 16 kHz (its 2 s chunks and the shorter last one)."""
    cfg = config or AudioConfig()
    whole, rest = divmod(num_mel_frames(num_samples, cfg), cfg.chunk_frames)
    return whole * audio_chunk_tokens(cfg.chunk_frames) + audio_chunk_tokens(rest)


@lru_cache(maxsize=1)
def _silero():
    """Silero's TorchScript model, loaded once from the installed package (offline)."""
    threads = torch.get_num_threads()
    try:
        from silero_vad import get_speech_timestamps, load_silero_vad
    except ImportError:
        raise ConfigError("the VAD needs the silero-vad package: pip install 'omnistream[vad]' (or pip install silero-vad)") from None
    finally:
        torch.set_num_threads(threads)  # importing silero_vad sets torch to 1 thread, process-wide
    return load_silero_vad(), get_speech_timestamps


def speech_segments(samples: np.ndarray, config: VadConfig | None = None) -> list[tuple[int, int]]:
    """[start, end) sample ranges of speech in 16 kHz mono samples."""
    cfg = config or VadConfig()
    model, get_speech_timestamps = _silero()
    model.reset_states()
    with torch.inference_mode():
        found = get_speech_timestamps(
            torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)), model, threshold=cfg.threshold,
            sampling_rate=VAD_RATE, min_speech_duration_ms=cfg.min_speech_ms, min_silence_duration_ms=cfg.min_silence_ms,
            speech_pad_ms=cfg.speech_pad_ms)
    return [(int(s["start"]), int(s["end"])) for s in found]


def drop_silence(clip: AudioClip, config: VadConfig | None = None, audio_config: AudioConfig | None = None) -> VadResult:
    """The clip's speech segments joined; MediaError when the VAD hears no speech at all (the
    request would have no audio left: send the clip without "vad" instead)."""
    acfg = audio_config or AudioConfig()
    if clip.sampling_rate != VAD_RATE:
        raise MediaError(f"the VAD takes {VAD_RATE} Hz audio, got {clip.sampling_rate} Hz")
    segments = speech_segments(clip.samples, config)
    kept = np.concatenate([clip.samples[a:b] for a, b in segments]) if segments else np.zeros(0, np.float32)
    if kept.shape[0] < acfg.min_samples:
        raise MediaError(f"the VAD found no speech in {clip.duration_s:.1f} s of audio (all of it would be dropped); "
                         f"send it without \"vad\" to hear it as it is")
    return VadResult(kept, segments, clip.samples.shape[0], audio_tokens(clip.samples.shape[0], acfg), audio_tokens(kept.shape[0], acfg))


def vad_source(src, audio_config: AudioConfig | None = None, config: VadConfig | None = None) -> tuple[dict, VadResult]:
    """An audio part's source (a path, {"array", "sampling_rate"} or a bare 16 kHz array, as
    media/audio_items.load_audio_source takes) -> ({"array": speech, "sampling_rate": 16000},
    the VadResult). Logged at INFO: the tokens saved."""
    acfg = audio_config or AudioConfig()
    if isinstance(src, (str, os.PathLike)):
        clip = decode_audio(src, acfg)
    elif isinstance(src, Mapping) and "array" in src and "sampling_rate" in src:
        clip = audio_from_array(src["array"], src["sampling_rate"], acfg)
    elif isinstance(src, (np.ndarray, torch.Tensor, list)):
        clip = audio_from_array(src, acfg.sampling_rate, acfg)
    else:
        raise UserInputError(f"unsupported audio source for the VAD: {type(src).__name__}")
    result = drop_silence(clip, config, acfg)
    log.info(result.summary())
    return {"array": result.samples, "sampling_rate": acfg.sampling_rate}, result
