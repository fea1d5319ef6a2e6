"""Audio input: files or arrays -> 16 kHz mono float32 samples -> log-mel features at the clip's
true length (Whisper's recipe, 128 bins), in torch.

Data flow:
  file (wav, mp3, flac, ogg, m4a, a video's audio track) --PyAV decode + PyAV resampler-->
  array {"array", "sampling_rate"} --(PyAV resampler unless already 16 kHz mono)-->
      AudioClip (N,) float32 at 16 kHz
  --log_mel_features--> (128, N // 160) float32: STFT (n_fft 400, hop 160, Hann, centred with
      reflection), power, Slaney mel filters 0-8 kHz, log10, clamp at (global max - 8), (x + 4) / 4

The features equal transformers' `WhisperFeatureExtractor` on the same samples without padding
(its torch path; tests/test_audio.py). Nothing is padded to 30 s or 300 s and nothing is cut: a
clip longer than `AudioConfig.max_seconds` is refused with an error that says so.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from omnistream.errors import ConfigError, MediaError, one_line
from omnistream.media.pyav import av, check_media_file, decoded_frames

SAMPLING_RATE = 16_000  # what the Whisper-style audio encoder was trained on


@dataclass(frozen=True)
class AudioConfig:
    """Audio settings; the defaults are Qwen2.5-Omni's feature extractor (Whisper's recipe)."""

    sampling_rate: int = SAMPLING_RATE  # samples per second after resampling
    num_mel_bins: int = 128
    n_fft: int = 400  # 25 ms window
    hop_length: int = 160  # 10 ms: 100 mel frames per second
    chunk_frames: int = 200  # the encoder's unit: 2 s of mel frames (n_window * 2), attended alone
    max_seconds: float = 1200.0  # longest clip accepted (30,000 audio tokens); longer ones are refused
    min_source_rate: int = 1_000  # plausible sampling rates of a source, Hz
    max_source_rate: int = 768_000

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"AudioConfig.{f.name} must be a positive number, got {value!r}")
        if self.hop_length > self.n_fft:
            raise ConfigError("AudioConfig.hop_length must not exceed n_fft")

    @property
    def min_samples(self) -> int:
        """Shortest clip that yields one audio token: 3 mel frames (30 ms at 16 kHz)."""
        return 3 * self.hop_length

    @property
    def max_samples(self) -> int:
        return int(self.max_seconds * self.sampling_rate)


@dataclass
class AudioClip:
    """Mono samples at the config's rate, with where they came from."""

    samples: np.ndarray  # (N,) float32
    sampling_rate: int
    source_rate: int  # the rate before resampling
    decode_s: float = 0.0

    @property
    def duration_s(self) -> float:
        return self.samples.shape[0] / self.sampling_rate


# ------------------------------------------------------------------------------------ decoding


def decode_audio(path: str | os.PathLike, config: AudioConfig | None = None) -> AudioClip:
    """The first audio stream of a file (any container FFmpeg reads, the audio track of a video
    included) -> 16 kHz mono float32. A truncated file keeps what decodes; nothing decodable,
    no audio stream, an implausible rate or a clip over max_seconds raise MediaError."""
    cfg = config or AudioConfig()
    path = check_media_file(Path(path), "audio")
    t0 = time.perf_counter()
    try:
        with av.open(str(path), "r") as container:
            if not container.streams.audio:
                kinds = ", ".join(s.type for s in container.streams) or "none"
                raise MediaError(f"no audio stream in {path} (streams: {kinds})")
            stream = container.streams.audio[0]
            rate = stream.codec_context.sample_rate or stream.rate or 0
            _check_rate(rate, f"audio stream of {path}", cfg)
            resampler = av.AudioResampler(format="flt", layout="mono", rate=cfg.sampling_rate)
            pieces, total = [], 0
            for frame in decoded_frames(container, stream):
                for out in resampler.resample(frame):
                    total += _append(pieces, out)
                if total > cfg.max_samples:
                    raise _too_long(total, cfg, path)
            for out in resampler.resample(None):  # the resampler's delayed tail
                total += _append(pieces, out)
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise MediaError(f"not a readable audio file: {path} ({one_line(exc)})") from None
    samples = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    return _checked(AudioClip(samples, cfg.sampling_rate, int(rate), time.perf_counter() - t0), cfg, str(path))


def audio_from_array(array, sampling_rate, config: AudioConfig | None = None) -> AudioClip:
    """Samples given by a caller -> 16 kHz mono float32. Accepts (N,) mono, or (C, N) / (N, C)
    with at most 8 channels (averaged); float in [-1, 1] or int16/int32 PCM (scaled). Another
    rate is resampled with PyAV's resampler; 16 kHz mono passes unchanged."""
    cfg = config or AudioConfig()
    t0 = time.perf_counter()
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, (int, np.integer)):
        raise MediaError(f"audio sampling_rate must be an integer (Hz), got {sampling_rate!r}")
    _check_rate(int(sampling_rate), "audio array", cfg)
    x = _as_float_mono(array)
    if x.shape[0] > cfg.max_seconds * int(sampling_rate):
        raise _too_long(round(x.shape[0] * cfg.sampling_rate / int(sampling_rate)), cfg, "audio array")
    if int(sampling_rate) != cfg.sampling_rate:
        x = _resample(x, int(sampling_rate), cfg.sampling_rate)
    return _checked(AudioClip(x, cfg.sampling_rate, int(sampling_rate), time.perf_counter() - t0), cfg, "audio array")


def _as_float_mono(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    if isinstance(array, (list, tuple)):
        array = np.asarray(array)
    if not isinstance(array, np.ndarray):
        raise MediaError(f"unsupported audio array type {type(array).__name__}")
    if array.dtype == np.int16:
        x = array.astype(np.float32) / 32768.0
    elif array.dtype == np.int32:
        x = (array.astype(np.float64) / 2147483648.0).astype(np.float32)
    elif np.issubdtype(array.dtype, np.floating):
        x = array.astype(np.float32)
    else:
        raise MediaError(f"audio samples must be float or int16/int32 PCM, got dtype {array.dtype}")
    if x.ndim == 2:
        channel_axis = 0 if x.shape[0] <= x.shape[1] else 1
        if x.shape[channel_axis] > 8:
            raise MediaError(f"audio array of shape {array.shape}: expected (samples,) or at most 8 channels")
        x = x.mean(axis=channel_axis, dtype=np.float32)
    elif x.ndim != 1:
        raise MediaError(f"audio array of shape {array.shape}: expected (samples,) or (channels, samples)")
    if not np.isfinite(x).all():
        raise MediaError("audio samples contain NaN or infinity")
    return np.ascontiguousarray(x)


def _resample(x: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """PyAV's (FFmpeg swresample) resampler over one mono float32 frame, tail flushed."""
    frame = av.AudioFrame.from_ndarray(x[None, :], format="flt", layout="mono")
    frame.sample_rate = src_rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=dst_rate)
    pieces: list[np.ndarray] = []
    for out in resampler.resample(frame) + resampler.resample(None):
        _append(pieces, out)
    return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)


def _append(pieces: list[np.ndarray], frame) -> int:
    data = frame.to_ndarray().reshape(-1).astype(np.float32, copy=False)  # packed mono: (1, n)
    pieces.append(data)
    return data.shape[0]


def _check_rate(rate: int, what: str, cfg: AudioConfig) -> None:
    if not cfg.min_source_rate <= rate <= cfg.max_source_rate:
        raise MediaError(f"{what}: sampling rate {rate} Hz is outside [{cfg.min_source_rate}, {cfg.max_source_rate}] Hz")


def _too_long(samples: int, cfg: AudioConfig, what) -> MediaError:
    return MediaError(f"{what}: audio longer than the configured maximum of {cfg.max_seconds:g} s "
                      f"(at least {samples / cfg.sampling_rate:.1f} s); it is not cut silently: "
                      "trim it or raise max_seconds")


def _checked(clip: AudioClip, cfg: AudioConfig, what: str) -> AudioClip:
    n = clip.samples.shape[0]
    if n == 0:
        raise MediaError(f"{what}: no decodable audio samples")
    if n < cfg.min_samples:
        raise MediaError(f"{what}: audio of {1000 * n / cfg.sampling_rate:.1f} ms is too short "
                         f"(at least {1000 * cfg.min_samples / cfg.sampling_rate:.0f} ms: one audio token)")
    if n > cfg.max_samples:
        raise _too_long(n, cfg, what)
    return clip



# ------------------------------------------------------------------------------------ features


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    mel = 3.0 * f / 200.0
    log_region = f >= 1000.0
    logstep = 27.0 / np.log(6.4)
    return np.where(log_region, 15.0 + np.log(np.maximum(f, 1e-12) / 1000.0) * logstep, mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f = 200.0 * m / 3.0
    logstep = np.log(6.4) / 27.0
    return np.where(m >= 15.0, 1000.0 * np.exp(logstep * (m - 15.0)), f)


@lru_cache(maxsize=4)
def mel_filter_bank(num_frequency_bins: int, num_mel_bins: int, sampling_rate: int, max_frequency: float = 8000.0) -> np.ndarray:
    """(num_frequency_bins, num_mel_bins) triangular Slaney-normalised filters on the Slaney mel
    scale from 0 Hz to max_frequency (what Whisper and its feature extractor use), float64."""
    mel_freqs = np.linspace(_hz_to_mel(0.0), _hz_to_mel(max_frequency), num_mel_bins + 2)
    filter_freqs = _mel_to_hz(mel_freqs)
    fft_freqs = np.linspace(0, sampling_rate // 2, num_frequency_bins)
    diff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    enorm = 2.0 / (filter_freqs[2 : num_mel_bins + 2] - filter_freqs[:num_mel_bins])
    return filters * enorm[None, :]


def num_mel_frames(num_samples: int, config: AudioConfig | None = None) -> int:
    """Mel frames of a clip: one per hop (the centred STFT's last frame is dropped)."""
    return num_samples // (config or AudioConfig()).hop_length


def log_mel_features(samples: np.ndarray | torch.Tensor, config: AudioConfig | None = None,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """(N,) float32 samples at the config's rate -> (num_mel_bins, N // hop) float32 on `device`,
    Whisper's log-mel recipe over exactly these samples (no padding)."""
    cfg = config or AudioConfig()
    x = torch.as_tensor(samples, dtype=torch.float32).to(device)
    if x.ndim != 1 or x.shape[0] < cfg.min_samples:
        raise MediaError(f"log-mel features need at least {cfg.min_samples} mono samples, got shape {tuple(x.shape)}")
    window = torch.hann_window(cfg.n_fft, device=x.device)
    stft = torch.stft(x, cfg.n_fft, cfg.hop_length, window=window, return_complex=True)  # (F, frames + 1)
    power = (stft[..., :-1].abs() ** 2).contiguous()
    filters = torch.from_numpy(mel_filter_bank(1 + cfg.n_fft // 2, cfg.num_mel_bins, cfg.sampling_rate))
    mel = filters.to(x.device, torch.float32).T @ power  # (mel, frames)
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)  # the clip's own maximum: whole clip at once
    return (log_spec + 4.0) / 4.0
