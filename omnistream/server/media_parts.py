"""OpenAI content parts -> the engine's chat messages and preprocessed MediaItems.

    resolver = MediaResolver(engine.processor, config)
    prepared = await resolver.prepare(body.messages, body.mm_processor_kwargs, tenant)
    build_prompt(tokenizer, prepared.messages, prepared.items)

Audio (models that hear, Qwen2.5-Omni): `input_audio` {data: base64, format} and `audio_url`
parts, and `use_audio_in_video` on a video (its audio track interleaved with its frames). A clip
is refused over `ServerConfig.max_audio_seconds` (from the container header first, then from the
decoded samples) and, for a model without an audio encoder, at once with `audio_not_supported`.
An audio part is 1 or 2 items (media/audio_items.py), a video with its track several; they fill
one placeholder together (one block).

Sources (server/media_sources.py): data: URLs, local files only under
`ServerConfig.allowed_media_path`, http(s) only with `allow_remote_media`.

Hostile media is refused as cheaply as possible: an image's size is read from its header (PIL
opens lazily) before any pixel is decoded; a video's duration, frame size and the number of
frames the request would sample come from the container header; the decoded clip is checked
again (headers lie). Decoding runs on a small thread pool, never on the event loop, and a
request waits at most `media_decode_timeout_s` per item (the worker thread cannot be killed: it
finishes in the background and its result is dropped; the pool's size bounds how many do).
With `media_decode_processes` (opt-in), images and videos
are decoded in worker processes instead (server/media_workers.py), the thread waiting for them:
the server's interpreter lock stays with its event loop.

Re-sent media (server/media_cache.py): items are cached by the sha256 of their bytes (with the
tenant and the options in the key), so a stateless client that re-sends the same video each turn pays the decode,
preprocess and hashing once; the engine then finds the item's KV in the prefix cache (or its
embeddings in the encoder cache) by the item's content hash, so it is not encoded again either.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
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
from omnistream.models.prompt import block_kind
from omnistream.server.config import ServerConfig
from omnistream.server.errors import APIError, BadRequest, TooLarge, as_api_error
from omnistream.server.media_cache import MEDIA_CACHE_BYTES, MediaCache
from omnistream.server.media_sources import Source, input_audio_source, read_source
from omnistream.server.media_workers import MediaWorkers, auto_processes
from omnistream.server.openai_protocol import (
    AudioURLPart,
    ImagePart,
    InputAudioPart,
    MediaOptions,
    Message,
    ProcessorKwargs,
    TextPart,
)

log = logging.getLogger(__name__)

LOW_DETAIL_MAX_PIXELS = 448 * 448  # image_url.detail == "low": 256 visual tokens at most
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


@dataclass
class PreparedMessages:
    messages: list[dict]  # the engine's format: content parts {"type": "text" | "image" | "video" | "audio"}
    items: list[MediaItem]  # in message order (an audio part, or a video with its audio, is a block of several)
    decode_s: float = 0.0  # decode + preprocess + hash paid by this request (0: all reused)
    reused: int = 0  # items served from the media cache


def _fresh_block(items: list[MediaItem]) -> list[MediaItem]:
    """A reused block under a new block_id: two equal clips in a row stay two blocks."""
    if len(items) < 2:
        return items
    block_id = uuid.uuid4().hex
    return [dataclasses.replace(m, block_id=block_id) for m in items]


class MediaResolver:
    def __init__(self, processor: MediaProcessor, config: ServerConfig, *, cache_bytes: int = MEDIA_CACHE_BYTES,
                 threads: int | None = None, hearing: Hearing | None = None, processes: int | None = None) -> None:
        self.processor, self.config, self.hearing = processor, config, hearing
        self.cache = MediaCache(cache_bytes)
        # 4 threads queued 32 clients' images and videos behind each other: +400 ms TTFT over HTTP (H200 bench serve)
        self.pool = ThreadPoolExecutor(threads or config.media_decode_threads, thread_name_prefix="media-decode")
        n = auto_processes(config.media_decode_processes if processes is None else processes)
        self.workers = MediaWorkers(processor, config, n) if n else None  # images and videos decoded there

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.workers is not None:
            self.workers.close()

    async def prepare(self, messages: list[Message], defaults: ProcessorKwargs | None,
                      tenant: str | None) -> PreparedMessages:
        """Every message in the engine's format; media parts decoded (or reused) in order."""
        out = PreparedMessages(messages=[], items=[])
        fallback = defaults.options() if defaults is not None else None
        for i, msg in enumerate(messages):
            role = "system" if msg.role == "developer" else msg.role
            if not isinstance(msg.content, list):
                out.messages.append({"role": role, "content": msg.content or ""})
                continue
            parts = []
            for j, part in enumerate(msg.content):
                if isinstance(part, TextPart):
                    parts.append({"type": "text", "text": part.text})
                    continue
                where = f"messages[{i}].content[{j}]"
                try:
                    items, spent, reused = await self._item(part, fallback, tenant)
                except (APIError, UserInputError) as e:
                    raise _located(e, where) from None
                parts.append({"type": block_kind(items)})
                out.items += _fresh_block(items) if reused else items
                out.decode_s += spent
                out.reused += reused
            out.messages.append({"role": role, "content": parts})
        return out

    async def _item(self, part, fallback: MediaOptions | None, tenant: str | None) -> tuple[list[MediaItem], float, bool]:
        """(the part's items, seconds spent, reused) for one media part, within the decode timeout."""
        if isinstance(part, ImagePart):
            kind, url, opts = "image", part.image_url.url, part.image_url.over(part.over(fallback))
            if part.image_url.detail == "low" and opts.max_pixels is None:
                opts = MediaOptions(**{**opts.model_dump(), "max_pixels": LOW_DETAIL_MAX_PIXELS})
        elif isinstance(part, (InputAudioPart, AudioURLPart)):
            self._hearing()  # refused before any byte is decoded
            kind, opts = "audio", MediaOptions()
            url = part.audio_url.url if isinstance(part, AudioURLPart) else part  # base64 decoded off the loop
        else:
            kind, url, opts = "video", part.video_url.url, part.video_url.over(part.over(fallback))
            if opts.use_audio_in_video:
                self._hearing()
        future = self.pool.submit(self._load, kind, url, opts, tenant)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.config.media_decode_timeout_s)
        except asyncio.TimeoutError:
            future.cancel()
            raise BadRequest(f"the {kind} took longer than {self.config.media_decode_timeout_s:g} s to decode",
                             code="media_decode_timeout") from None

    def _hearing(self) -> Hearing:
        if self.hearing is None:
            raise BadRequest("this model does not take audio (input_audio, audio_url, use_audio_in_video): "
                             "serve a Qwen2.5-Omni checkpoint", code="audio_not_supported")
        return self.hearing

    # ---------------------------------------------------------------- worker thread
    def _load(self, kind: str, url: str | InputAudioPart, opts: MediaOptions, tenant: str | None) -> tuple[list[MediaItem], float, bool]:
        src = input_audio_source(url) if isinstance(url, InputAudioPart) else read_source(url, kind, self.config)
        key = (tenant, kind, src.digest, opts.fps, opts.nframes, opts.min_pixels, opts.max_pixels,
               bool(opts.use_audio_in_video) and kind == "video")
        items = self.cache.get(key)
        if items is not None:
            return items, 0.0, True
        t0 = time.perf_counter()
        if self.workers is not None and kind in ("image", "video") and not opts.use_audio_in_video:
            items = self.workers.decode(kind, src, opts)  # this thread waits; the decoding holds no lock here
        elif kind == "image":
            items = [self._image(src, opts)]
        elif kind == "audio":
            items = self._audio(src)
        else:
            items = self._video(src, opts)
        self.cache.put(key, items)
        return items, time.perf_counter() - t0, False

    def _image(self, src: Source, opts: MediaOptions) -> MediaItem:
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

    def _video(self, src: Source, opts: MediaOptions) -> list[MediaItem]:
        with _as_file(src, "video") as path:
            return self._video_file(path, src.label, opts)

    def _video_file(self, path: Path, label: str, opts: MediaOptions) -> list[MediaItem]:
        with _labelled(path, label):
            self._check_video_header(path, opts)
            item = self.processor.process_video(path, fps=opts.fps, nframes=opts.nframes,
                                                min_pixels=opts.min_pixels, max_pixels=opts.max_pixels)
        frames = len(item.timestamps)
        if frames > self.config.max_video_frames:  # the header announced fewer
            raise TooLarge(f"video samples {frames} frames, over the limit of {self.config.max_video_frames}")
        if not opts.use_audio_in_video:
            return [item]
        hearing = self._hearing()
        return hearing.interleave(item, self._audio_file(path, label), uuid.uuid4().hex)

    def _audio(self, src: Source) -> list[MediaItem]:
        with _as_file(src, "audio") as path:
            return self._audio_file(path, src.label)

    def _audio_file(self, path: Path, label: str) -> list[MediaItem]:
        """The file's first audio stream -> its items: the duration from the header first (a
        413 before decoding), then the decoded samples against the same limit (headers lie)."""
        limit = self.config.max_audio_seconds
        config = self._hearing().config
        config = dataclasses.replace(config, max_seconds=min(config.max_seconds, limit))
        with _labelled(path, label):
            seconds = _audio_seconds(path)
            if seconds is not None and seconds > limit:
                raise TooLarge(f"audio of {seconds:.1f} s exceeds the limit of {limit:g} s")
            return load_audio_source(path, config, model_key=self.processor.model_key)

    def _check_video_header(self, path: Path, opts: MediaOptions) -> None:
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


def _located(e: Exception, where: str) -> APIError:
    """The error of one content part, naming the part."""
    err = as_api_error(e)
    return err.placed(f"{where}: {err.message}", where)


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


