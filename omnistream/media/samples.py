"""Synthetic media for tests and demos: small videos and images in the formats users send, and a
set of broken files that must be rejected with a MediaError.

Frames are drawn with numpy (moving shapes over a drifting background with a scene cut halfway)
and encoded with PyAV's bundled FFmpeg. Encoders available for writing in PyAV 18's wheels:
libx264 (h264), libx265 (hevc), mpeg4, libvpx (vp8), libvpx-vp9, mjpeg, ffv1, libsvtav1.
"""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

from omnistream.media.pyav import av
import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

# Short codec names -> FFmpeg encoder, default pixel format, encoder options (small files).
_ENCODERS: dict[str, tuple[str, str, dict[str, str]]] = {
    "h264": ("libx264", "yuv420p", {"crf": "30", "preset": "veryfast"}),
    "hevc": ("libx265", "yuv420p", {"crf": "32", "preset": "veryfast", "x265-params": "log-level=error"}),
    "mpeg4": ("mpeg4", "yuv420p", {"qscale": "8"}),
    "vp8": ("libvpx", "yuv420p", {"crf": "30", "b": "300k", "deadline": "realtime", "cpu-used": "8"}),
    "vp9": ("libvpx-vp9", "yuv420p", {"crf": "40", "b": "0", "deadline": "realtime", "cpu-used": "8"}),
    "mjpeg": ("mjpeg", "yuvj420p", {"qscale": "12"}),
    "ffv1": ("ffv1", "yuv420p", {}),
}
# 4:2:0 needs even sides; these formats keep full chroma and accept any size.
_ODD_SIZE_PIX_FMT = {"h264": "yuv444p", "hevc": "yuv444p", "mjpeg": "yuvj444p", "ffv1": "yuv444p"}
# Same arguments, same bytes, on any machine: without these the muxers write the library
# version, and Matroska a random segment UID and the date; and the encoders pick a thread
# count from the CPUs available (x264 cuts each frame into one slice per thread), so the
# bitstream depended on the machine and its load.
_BITEXACT_CONTAINER = {"fflags": "+bitexact"}
_BITEXACT_CODEC = {"flags": "+bitexact"}
_ENCODER_THREADS = 1


def sample_frame(index: int, num_frames: int, height: int, width: int) -> np.ndarray:
    """Frame `index` of a synthetic clip: (height, width, 3) uint8.

    Two scenes (cut at num_frames // 2) with different background gradients that drift over
    time, a circle moving left to right and a square moving top to bottom.
    """
    t = index / max(num_frames - 1, 1)  # 0 .. 1 over the clip
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)  # (H, W) each
    scene = 0 if index < num_frames // 2 else 1
    base = np.array([[40, 90, 160], [170, 120, 40]][scene], dtype=np.float32)  # blue / orange
    drift = 60 * (xx / width + yy / height + t) % 60  # moving diagonal bands, (H, W)
    frame = base[None, None, :] + drift[..., None] * np.array([0.5, 1.0, 0.7], dtype=np.float32)
    # Circle: radius 1/6 of the short side, moving horizontally.
    radius = min(height, width) / 6
    cx, cy = radius + t * (width - 2 * radius), height / 3
    frame[(xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2] = (230, 40, 40)
    # Square: side 1/5 of the short side, moving vertically.
    side = min(height, width) / 5
    sx, sy = 2 * width / 3, t * (height - side)
    frame[(xx >= sx) & (xx < sx + side) & (yy >= sy) & (yy < sy + side)] = (40, 220, 60)
    return np.clip(frame, 0, 255).astype(np.uint8)


def write_sample_video(
    path: str | Path,
    *,
    seconds: float = 4.0,
    fps: float = 10,
    width: int = 320,
    height: int = 240,
    codec: str = "h264",
    pts_jitter: float = 0.0,
    faststart: bool = False,
) -> Path:
    """Encode a synthetic clip; the container comes from the suffix (.mp4, .webm, .mkv, .avi).

    `codec` is one of h264, hevc, mpeg4, vp8, vp9, mjpeg, ffv1. `pts_jitter` (0..0.45) moves
    each frame's timestamp by up to that fraction of a frame period, giving variable frame rate.
    `faststart` puts the mp4 index first (so a truncated file still opens).
    """
    path = Path(path)
    encoder, pix_fmt, options = _ENCODERS[codec]
    if width % 2 or height % 2:
        pix_fmt = _ODD_SIZE_PIX_FMT.get(codec, pix_fmt)
    num_frames = max(1, round(seconds * fps))
    rate = Fraction(fps).limit_denominator(1001)
    container_options = {**_BITEXACT_CONTAINER, **({"movflags": "faststart"} if faststart else {})}
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", options=container_options) as out:
        single = {"threads": "1", "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0"} if "264" in encoder else {"threads": "1"}
        stream = out.add_stream(encoder, rate=rate, options={**_BITEXACT_CODEC, **single, **options})
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.codec_context.thread_count = _ENCODER_THREADS
        # Millisecond ticks so jittered timestamps are representable.
        stream.codec_context.time_base = Fraction(1, 1000) if pts_jitter else 1 / rate
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(sample_frame(i, num_frames, height, width), format="rgb24")
            if pts_jitter:
                jitter = rng.uniform(-pts_jitter, pts_jitter) if i else 0.0
                frame.pts, frame.time_base = round((i + jitter) * 1000 / fps), Fraction(1, 1000)
            else:
                frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))  # flush delayed frames (B-frames, lookahead)
    return path


def write_image(path: str | Path, *, width: int = 320, height: int = 240, mode: str = "RGB") -> Path:
    """Save one synthetic frame as an image; the format comes from the suffix.

    mode "RGBA" adds a radial alpha ramp (transparent corners), "L" is grayscale, "P" a palette.
    """
    path = Path(path)
    rgb = sample_frame(3, 10, height, width)
    image = Image.fromarray(rgb)
    if mode == "RGBA":
        yy, xx = np.mgrid[0:height, 0:width]
        dist = np.hypot((yy - height / 2) / height, (xx - width / 2) / width)  # 0 centre .. 0.7
        alpha = np.clip(255 * (1.4 - 2.5 * dist), 0, 255).astype(np.uint8)
        image = Image.fromarray(np.dstack([rgb, alpha]))
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path)
    return path


def write_media_corpus(directory: str | Path) -> list[Path]:
    """A folder of small, valid, real-world-like media files (each < 300 KB); returns the paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    videos = [
        ("h264.mp4", {"codec": "h264"}),
        ("vp9.webm", {"codec": "vp9", "seconds": 3.0}),
        ("vp8.webm", {"codec": "vp8", "seconds": 2.0, "width": 160, "height": 120}),
        ("mpeg4.mkv", {"codec": "mpeg4", "seconds": 3.0}),
        ("hevc.mkv", {"codec": "hevc", "seconds": 2.0, "width": 192, "height": 108}),
        ("mjpeg.avi", {"codec": "mjpeg", "seconds": 2.0, "width": 160, "height": 120}),
        ("odd_333x197.mp4", {"codec": "h264", "seconds": 2.0, "width": 333, "height": 197}),
        ("portrait_180x320.mp4", {"codec": "h264", "seconds": 2.0, "width": 180, "height": 320}),
        ("fps60.mp4", {"codec": "h264", "seconds": 2.0, "fps": 60, "width": 160, "height": 120}),
        ("ntsc_29.97.mp4", {"codec": "h264", "seconds": 2.0, "fps": 30000 / 1001, "height": 96}),
        ("short_1s.mp4", {"codec": "h264", "seconds": 1.0, "width": 160, "height": 120}),
        ("vfr.mkv", {"codec": "h264", "seconds": 3.0, "pts_jitter": 0.4, "width": 160, "height": 120}),
    ]
    paths = [write_sample_video(d / name, **kwargs) for name, kwargs in videos]
    images = [
        ("still.jpg", {}),
        ("alpha.png", {"mode": "RGBA"}),
        ("gray.png", {"mode": "L"}),
        ("palette.gif", {"mode": "P"}),
        ("photo.webp", {}),
        ("odd.bmp", {"width": 97, "height": 61}),
    ]
    paths += [write_image(d / name, **kwargs) for name, kwargs in images]
    return paths


def write_truncated_video(path: str | Path, *, keep: float = 0.6) -> Path:
    """An mp4 whose index (moov first) announces more frames than its cut-off data holds."""
    path = Path(path)
    full = path.with_name(path.stem + ".full.mp4")
    write_sample_video(full, seconds=4.0, faststart=True)
    data = full.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    full.unlink()
    return path


def write_broken_corpus(directory: str | Path) -> list[Path]:
    """Files that look like media by name but cannot be used; each must raise MediaError."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    good = write_sample_video(d / "good.tmp.mp4", seconds=2.0)  # index (moov) at the end
    data = good.read_bytes()
    good.unlink()
    broken = {
        "empty.mp4": b"",
        "truncated.mp4": data[: int(len(data) * 0.3)],
        "random.mp4": np.random.default_rng(1).integers(0, 256, 50_000, dtype=np.uint8).tobytes(),
        "text.mp4": b"This is not a video.\nJust a few lines of text.\n" * 40,
    }
    paths = []
    for name, payload in broken.items():
        (d / name).write_bytes(payload)
        paths.append(d / name)
    paths.append(_write_audio_only(d / "audio_only.wav"))
    paths.append(_write_no_frames(d / "no_frames.avi"))
    return paths


def _write_audio_only(path: Path, seconds: float = 1.0, rate: int = 16000) -> Path:
    """A valid WAV (a 440 Hz tone) with no video stream."""
    samples = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate) * 32767).astype(np.int16)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("pcm_s16le", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="s16", layout="mono")
        frame.sample_rate = rate
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def _write_no_frames(path: Path, count: int = 3) -> Path:
    """An MJPEG AVI whose video packets hold garbage: a valid container, zero decodable frames.
    (A container with no packets at all is not even written by FFmpeg.)"""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mjpeg", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuvj420p"
        for i in range(count):
            packet = av.Packet(b"\x00garbage" * 50)
            packet.stream, packet.pts, packet.dts, packet.time_base = stream, i, i, Fraction(1, 10)
            out.mux(packet)
    return path


def write_audio(path: str | Path, samples: np.ndarray, rate: int, codec: str = "pcm_s16le", fmt: str = "s16") -> Path:
    """(channels, n) float samples in [-1, 1] as an audio file (codec and sample format as
    FFmpeg names them: pcm_s16le/s16, flac/s16, libmp3lame/fltp, libopus/flt, aac/fltp)."""
    path = Path(path)
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        _mux_audio(out, stream, samples, rate, fmt, layout)
    return path


def write_video_with_audio(path: str | Path, frames: list[np.ndarray], audio: np.ndarray, fps: int, rate: int,
                           bit_rate: int | None = None) -> Path:
    """An mp4 of RGB frames (H, W, 3) uint8 as mpeg4 at `fps` and (1, n) float audio as aac."""
    path = Path(path)
    with av.open(str(path), "w") as out:
        v = out.add_stream("mpeg4", rate=fps)
        v.height, v.width = frames[0].shape[:2]
        v.pix_fmt = "yuv420p"
        if bit_rate is not None:
            v.bit_rate = bit_rate
        a = out.add_stream("aac", rate=rate, layout="mono")
        for i, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts = i
            out.mux(v.encode(frame))
        _mux_audio(out, a, audio, rate, "fltp", "mono")
        out.mux(v.encode(None))
    return path


def _mux_audio(out, stream, samples: np.ndarray, rate: int, fmt: str, layout: str) -> None:
    """Encodes (channels, n) float samples into `stream` in the codec's frame size, then flushes it."""
    frame_size = stream.codec_context.frame_size or 1024
    pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16) if fmt.startswith("s16") else samples
    for start in range(0, pcm.shape[1], frame_size):
        block = pcm[:, start : start + frame_size]
        data = block.T.reshape(1, -1) if not fmt.endswith("p") else block  # packed or planar
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=fmt, layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
        out.mux(stream.encode(frame))
    out.mux(stream.encode(None))
