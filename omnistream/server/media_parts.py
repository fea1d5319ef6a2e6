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

Decoding (server/media_decode.py: hostile media refused from headers first, the decoded clip
checked again) runs on a small thread pool, never on the event loop, and a request waits at most
`media_decode_timeout_s` per item (the worker thread cannot be killed: it finishes in the
background and its result is dropped; the pool's size bounds how many do). With
`media_decode_processes` (opt-in), images and videos are decoded in worker processes instead
(server/media_workers.py), the thread waiting for them: the server's interpreter lock stays
with its event loop.

Re-sent media (server/media_cache.py): items are cached by the sha256 of their bytes (with the
tenant and the options in the key), so a stateless client that re-sends the same video each
turn pays the decode, preprocess and hashing once; the engine then finds the item's KV in the
prefix cache (or its embeddings in the encoder cache) by the item's content hash, so it is not
encoded again either.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from omnistream.errors import UserInputError
from omnistream.media.item import MediaItem
from omnistream.media.processor import MediaProcessor
from omnistream.models.prompt import block_kind
from omnistream.server.config import ServerConfig
from omnistream.server.errors import APIError, BadRequest, as_api_error
from omnistream.server.media_cache import MEDIA_CACHE_BYTES, MediaCache
from omnistream.server.media_decode import Hearing, MediaDecoder
from omnistream.server.media_sources import input_audio_source, read_source
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

LOW_DETAIL_MAX_PIXELS = 448 * 448  # image_url.detail == "low": 256 visual tokens at most


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
        self.config = config
        self.decoder = MediaDecoder(processor, config, hearing)  # in this process's threads
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
            self.decoder.hearing_or_refuse()  # refused before any byte is decoded
            kind, opts = "audio", MediaOptions()
            url = part.audio_url.url if isinstance(part, AudioURLPart) else part  # base64 decoded off the loop
        else:
            kind, url, opts = "video", part.video_url.url, part.video_url.over(part.over(fallback))
            if opts.use_audio_in_video:
                self.decoder.hearing_or_refuse()
        future = self.pool.submit(self._load, kind, url, opts, tenant)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.config.media_decode_timeout_s)
        except asyncio.TimeoutError:
            future.cancel()
            raise BadRequest(f"the {kind} took longer than {self.config.media_decode_timeout_s:g} s to decode",
                             code="media_decode_timeout") from None

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
            items = [self.decoder.image(src, opts)]
        elif kind == "audio":
            items = self.decoder.audio(src)
        else:
            items = self.decoder.video(src, opts)
        self.cache.put(key, items)
        return items, time.perf_counter() - t0, False


def _located(e: Exception, where: str) -> APIError:
    """The error of one content part, naming the part."""
    err = as_api_error(e)
    return err.placed(f"{where}: {err.message}", where)
