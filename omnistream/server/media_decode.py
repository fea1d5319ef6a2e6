"""Decoding one media part's bytes, refusing hostile media as cheaply as possible: an image's
size is read from its header (PIL opens lazily) before any pixel is decoded; a video's
duration, frame size and the number of frames the request would sample come from the container
header; the decoded clip is checked again (headers lie); an audio track's duration likewise.
Whatever a decoder raises on crafted bytes is the media's fault (a 400 naming the part as the
client knows it, never a server-side temp path). Used by the server's decode threads
(server/media_parts.py) and its decode worker processes (server/media_workers.py) alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import tempfile
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from omnistream.errors import MediaError, UserInputError, one_line
from omnistream.media.audio import AudioConfig
from omnistream.media.audio_items import load_audio_source
from omnistream.media.item import MediaItem
from omnistream.media.processor import MediaProcessor
from omnistream.media.pyav import av
from omnistream.media.video import smart_nframes
from omnistream.server.config import ServerConfig
from omnistream.server.errors import APIError, BadRequest, TooLarge
from omnistream.server.media_sources import Source
from omnistream.server.openai_protocol import MediaOptions

log = logging.getLogger(__name__)

IMAGE_FORMATS = ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"]  # never PIL's EPS (Ghostscript) & co.


@dataclass(frozen=True)
class Hearing:
    """What a model that hears needs from ingestion: its audio features' settings, and how it
    interleaves a video with its audio track (Qwen2.5-Omni: per 2 s)."""

    config: AudioConfig
    interleave: Callable[[MediaItem, Sequence[MediaItem], str], list[MediaItem]]

    @classmethod
    def of(cls, model) -> "Hearing | None":
        """None for a model without an audio encoder (it has no `audio_config`)."""
        config = getattr(model, "audio_config", None)
        return None if config is None else cls(config, model.interleave_media)


class MediaDecoder:
    """Bytes (a Source) -> MediaItems, under the server's limits."""

    def __init__(self, processor: MediaProcessor, config: ServerConfig, hearing: Hearing | None = None) -> None:
        self.processor, self.config, self.hearing = processor, config, hearing

    def hearing_or_refuse(self) -> Hearing:
        if self.hearing is None:
            raise BadRequest("this model does not take audio (input_audio, audio_url, use_audio_in_video): "
                             "serve a Qwen2.5-Omni checkpoint", code="audio_not_supported")
        return self.hearing

    def image(self, src: Source, opts: MediaOptions) -> MediaItem:
        data = src.data
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # header only, no pixels
        except Image.DecompressionBombError as e:
            raise TooLarge(f"image too large: {e}") from None
        except UnidentifiedImageError:  # PIL's own text names an in-memory file: nothing to add
            raise MediaError(f"{src.label} is not an image in a supported format ({', '.join(IMAGE_FORMATS)})") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise MediaError(f"{src.label} is not an image in a supported format "
                             f"({', '.join(IMAGE_FORMATS)}): {one_line(e)}") from None
        w, h = image.size
        if w * h > self.config.max_image_pixels:
            raise TooLarge(f"image of {w}x{h} pixels exceeds the limit of {self.config.max_image_pixels} pixels")
        with warnings.catch_warnings(), _hostile(src.label):
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return self.processor.process_image(image, min_pixels=opts.min_pixels, max_pixels=opts.max_pixels)

    def video(self, src: Source, opts: MediaOptions) -> list[MediaItem]:
        with _as_file(src, "video") as path:
            return self.video_file(path, src.label, opts)

    def video_file(self, path: Path, label: str, opts: MediaOptions) -> list[MediaItem]:
        with _labelled(path, label):
            self.check_video_header(path, opts)
            item = self.processor.process_video(path, fps=opts.fps, nframes=opts.nframes,
                                                min_pixels=opts.min_pixels, max_pixels=opts.max_pixels)
        frames = len(item.timestamps)
        if frames > self.config.max_video_frames:  # the header announced fewer
            raise TooLarge(f"video samples {frames} frames, over the limit of {self.config.max_video_frames}")
        if not opts.use_audio_in_video:
            return [item]
        hearing = self.hearing_or_refuse()
        return hearing.interleave(item, self.audio_file(path, label), uuid.uuid4().hex)

    def audio(self, src: Source) -> list[MediaItem]:
        with _as_file(src, "audio") as path:
            return self.audio_file(path, src.label)

    def audio_file(self, path: Path, label: str) -> list[MediaItem]:
        """The file's first audio stream -> its items: the duration from the header first (a
        413 before decoding), then the decoded samples against the same limit (headers lie)."""
        limit = self.config.max_audio_seconds
        config = self.hearing_or_refuse().config
        config = dataclasses.replace(config, max_seconds=min(config.max_seconds, limit))
        with _labelled(path, label):
            seconds = _audio_seconds(path)
            if seconds is not None and seconds > limit:
                raise TooLarge(f"audio of {seconds:.1f} s exceeds the limit of {limit:g} s")
            return load_audio_source(path, config, model_key=self.processor.model_key)

    def check_video_header(self, path: Path, opts: MediaOptions) -> None:
        """Duration, frame size and sampled frame count from the container header (no decoding)."""
        cfg, mcfg = self.config, self.processor.config
        fps, frames, seconds, w, h = _probe(path)
        if seconds > cfg.max_video_seconds:
            raise TooLarge(f"video of {seconds:.1f} s exceeds the limit of {cfg.max_video_seconds:g} s")
        if w * h > cfg.max_image_pixels:
            raise TooLarge(f"video frames of {w}x{h} pixels exceed the limit of {cfg.max_image_pixels} pixels")
        sampled = smart_nframes(max(frames, 1), fps, fps=opts.fps or mcfg.fps, nframes=opts.nframes,
                                min_frames=mcfg.min_frames, max_frames=max(mcfg.max_frames, cfg.max_video_frames + 2))
        if sampled > cfg.max_video_frames:
            raise TooLarge(f"video would sample {sampled} frames, over the limit of {cfg.max_video_frames} "
                           "(ask for a lower fps or fewer nframes)")


@contextlib.contextmanager
def _hostile(label: str):
    """Decoding untrusted bytes: whatever a decoder raises on them (PIL and FFmpeg raise
    SyntaxError, struct.error, zlib.error, ... on crafted files) is the media's fault, a 400.
    Logged with its traceback in case it is ours after all."""
    try:
        yield
    except (UserInputError, APIError):
        raise
    except Exception as e:  # noqa: BLE001
        log.warning("decoding %s failed", label, exc_info=True)
        raise MediaError(f"cannot decode {label}: {type(e).__name__}: {one_line(e)}") from None


@contextlib.contextmanager
def _as_file(src: Source, kind: str):
    """The source as a file PyAV can open: its verified path, or its bytes in a temp file."""
    if src.path is not None:
        yield src.path
        return
    with tempfile.TemporaryDirectory(prefix=f"omnistream-{kind}-") as tmp:
        path = Path(tmp) / kind
        path.write_bytes(src.data)
        yield path


@contextlib.contextmanager
def _labelled(path: Path, label: str):
    """Decoding errors name the media as the client knows it, never a server-side temp path."""
    try:
        with _hostile(label):
            yield
    except (MediaError, UserInputError) as e:
        if isinstance(e, APIError):
            raise
        raise type(e)(str(e).replace(str(path), label)) from None


def _audio_seconds(path: Path) -> float | None:
    """The first audio stream's duration from the container header; None when it has none
    (the decoded samples are checked then). No audio stream: the decoder's error says so."""
    try:
        with av.open(str(path), "r") as c:
            if not c.streams.audio:
                return None
            s = c.streams.audio[0]
            if s.duration and s.time_base:
                return float(s.duration * s.time_base)
            return c.duration / av.time_base if c.duration else None
    except (av.FFmpegError, OSError, ValueError):
        return None  # the decoder reports what is wrong with it


def _probe(path: Path) -> tuple[float, int, float, int, int]:
    """(frame rate, frames, seconds, width, height) of the first video stream, from headers."""
    try:
        with av.open(str(path), "r") as c:
            if not c.streams.video:
                raise MediaError("no video stream in the file")
            s = c.streams.video[0]
            if s.codec_context is None:  # a stream whose codec FFmpeg does not know (crafted header)
                raise MediaError("the video stream has no decodable codec")
            rate = next((float(r) for r in (s.average_rate, s.guessed_rate, s.base_rate) if r and r > 0), 0.0)
            if rate <= 0:
                raise MediaError("cannot determine the video's frame rate")
            if c.duration:
                seconds = c.duration / av.time_base
            elif s.duration and s.time_base:
                seconds = float(s.duration * s.time_base)
            else:
                seconds = s.frames / rate
            frames = s.frames or max(1, round(seconds * rate))
            return rate, frames, seconds, s.codec_context.width, s.codec_context.height
    except (av.FFmpegError, OSError, ValueError) as e:
        raise MediaError(f"not a readable video: {one_line(e)}") from None
