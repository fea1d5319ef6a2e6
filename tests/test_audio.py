"""Audio input: PyAV decoding of every common format (and a video's audio track), resampling to
16 kHz mono, clear errors for bad audio, and log-mel features equal to transformers'
WhisperFeatureExtractor on the same unpadded samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from omnistream.errors import MediaError
from omnistream.media import samples
from omnistream.media.audio import AudioConfig, audio_from_array, decode_audio, log_mel_features, num_mel_frames
from omnistream.media.samples import write_audio  # noqa: F401 - other test modules import it from here


def tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1, seed: int = 0) -> np.ndarray:
    """(channels, n) float32: a tone plus a little noise (so every mel bin is non-trivial)."""
    n = int(round(seconds * rate))
    t = np.arange(n) / rate
    rng = np.random.default_rng(seed)
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.02 * rng.standard_normal(n)
    return np.stack([x * (1 - 0.3 * c) for c in range(channels)]).astype(np.float32)


# (suffix, codec, sample format, rate, channels)
FORMATS = [
    (".wav", "pcm_s16le", "s16", 16000, 1),
    (".flac", "flac", "s16", 44100, 2),
    (".mp3", "libmp3lame", "fltp", 44100, 2),
    (".ogg", "libopus", "flt", 48000, 1),
    (".m4a", "aac", "fltp", 22050, 1),
]


def write_video_with_audio(path: Path, seconds: float, fps: int = 4, size: int = 56, rate: int = 44100, seed: int = 0) -> Path:
    """An mp4 (mpeg4 video, aac audio): moving noise frames and a tone."""
    base = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    frames = [np.roll(base, 5 * i, axis=1) for i in range(int(seconds * fps))]
    return samples.write_video_with_audio(path, frames, tone(seconds, rate, freq=330.0, seed=seed), fps, rate)


@pytest.mark.parametrize("suffix,codec,fmt,rate,channels", FORMATS, ids=[f[0] for f in FORMATS])
def test_decode_formats(tmp_path, suffix, codec, fmt, rate, channels):
    path = write_audio(tmp_path / f"clip{suffix}", tone(1.5, rate, channels=channels), rate, codec, fmt)
    clip = decode_audio(path)
    assert clip.sampling_rate == 16000 and clip.source_rate == rate
    assert clip.samples.dtype == np.float32 and clip.samples.ndim == 1
    # encoders add priming / padding samples (aac, mp3, opus): within 80 ms of the true length
    assert abs(clip.duration_s - 1.5) < 0.08, clip.duration_s
    # the tone survives decoding and resampling: its energy sits at 440 Hz
    spectrum = np.abs(np.fft.rfft(clip.samples))
    peak_hz = np.argmax(spectrum) * 16000 / clip.samples.shape[0]
    assert abs(peak_hz - 440) < 5, peak_hz


def test_video_audio_track(tmp_path):
    clip = decode_audio(write_video_with_audio(tmp_path / "v.mp4", seconds=2.0))
    assert clip.source_rate == 44100 and abs(clip.duration_s - 2.0) < 0.08


def test_wav_at_16k_is_lossless(tmp_path):
    x = tone(0.5, 16000)
    clip = decode_audio(write_audio(tmp_path / "a.wav", x, 16000, "pcm_s16le", "s16"))
    expect = (x[0] * 32767).astype(np.int16).astype(np.float32) / 32768
    assert np.abs(clip.samples - expect).max() < 1e-6


def test_arrays():
    x = tone(1.0, 16000)[0]
    assert np.array_equal(audio_from_array(x, 16000).samples, x)  # 16 kHz mono passes unchanged
    stereo = audio_from_array(tone(1.0, 48000, channels=2), 48000)  # (C, N), resampled
    assert abs(stereo.samples.shape[0] - 16000) <= 16 and stereo.source_rate == 48000
    pcm = audio_from_array((x * 32767).astype(np.int16), 16000)
    assert np.abs(pcm.samples - x).max() < 1e-4
    assert audio_from_array(torch.from_numpy(x), 16000).samples.shape == x.shape


@pytest.mark.parametrize("array,rate,match", [
    (np.zeros(0, np.float32), 16000, "no decodable"),
    (np.zeros(100, np.float32), 16000, "too short"),
    (np.array([0.0, np.nan] * 1000, np.float32), 16000, "NaN"),
    (np.zeros(16000, np.float32), 50, "sampling rate"),
    (np.zeros(16000, np.float32), 10**7, "sampling rate"),
    (np.zeros(16000, np.float32), 16000.5, "integer"),
    (np.zeros((16, 1000), np.float32), 16000, "channels"),
    (np.array(["a", "b"]), 16000, "dtype"),
])
def test_bad_arrays(array, rate, match):
    with pytest.raises(MediaError, match=match):
        audio_from_array(array, rate)


def test_too_long_is_refused_not_cut(tmp_path):
    cfg = AudioConfig(max_seconds=1.0)
    with pytest.raises(MediaError, match="maximum of 1 s"):
        audio_from_array(np.zeros(16001 * 3, np.float32), 48000, cfg)
    path = write_audio(tmp_path / "long.wav", tone(2.0, 16000), 16000, "pcm_s16le", "s16")
    with pytest.raises(MediaError, match="maximum of 1 s"):
        decode_audio(path, cfg)


def test_bad_files(tmp_path):
    good = write_audio(tmp_path / "good.mp3", tone(2.0, 44100), 44100, "libmp3lame", "fltp").read_bytes()
    cases = {
        "missing.wav": None,
        "empty.wav": b"",
        "text.mp3": b"not audio at all\n" * 200,
        "random.ogg": np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes(),
    }
    for name, payload in cases.items():
        if payload is not None:
            (tmp_path / name).write_bytes(payload)
        with pytest.raises(MediaError):
            decode_audio(tmp_path / name)
    with pytest.raises(MediaError, match="directory"):
        decode_audio(tmp_path)
    from omnistream.media.samples import write_sample_video

    with pytest.raises(MediaError, match="no audio stream"):
        decode_audio(write_sample_video(tmp_path / "silent.mp4", seconds=1.0))
    # a truncated file keeps what decodes
    (tmp_path / "cut.mp3").write_bytes(good[: len(good) // 2])
    clip = decode_audio(tmp_path / "cut.mp3")
    assert 0.5 < clip.duration_s < 1.5


@pytest.mark.parametrize("seconds", [0.03, 0.5, 2.0, 3.37, 10.0])
def test_features_equal_whisper_feature_extractor(seconds):
    transformers = pytest.importorskip("transformers")
    fe = transformers.WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=300, n_fft=400)
    x = tone(seconds, 16000, seed=int(seconds * 100))[0]
    ref = fe(x, sampling_rate=16000, padding="longest", return_tensors="np")["input_features"][0]
    ours = log_mel_features(x)
    assert ours.shape == (128, num_mel_frames(x.shape[0])) == ref.shape  # true length, no padding
    assert np.abs(ours.numpy() - ref).max() < 1e-5
