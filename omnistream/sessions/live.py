"""Live video sessions: frames arrive one by one while questions come at any moment.

    live = engine.live_session(max_pixels=448 * 448)
    live.add_frame(frame, timestamp)      # returns at once; a worker thread ingests
    live.add_audio(samples, timestamp)    # Qwen2.5-Omni: sound on the same clock (policy exact)
    live.ask("What just happened?")       # answers over the frames and audio ingested so far

Data flow of a frame (worker thread): resize once to the session's size -> pair into a
temporal patch (2 frames, the unit the vision tower encodes) -> frame memory decides (Star of
important patches + Stream window of recent ones, near-duplicates dropped) -> a retained patch
is patchified and hashed once -> the context prefix (system + video block) is prefilled (a
request to the engine core, like any other), so a later question costs only its own tokens.
While more frames are queued the prefill waits (one prefill per burst, not per frame), and a
question skips it entirely: a question waits for the frames added before it to pass the frame
memory, then builds its context once. A frame is checked in add_frame() (decodable, timestamp
not before the previous one): a bad one is refused for that call alone. A trailing odd frame
is part of the next answer, padded by repeating it as Qwen pads an odd frame count; when its
pair arrives, the real patch replaces it.

Audio (models that hear, policy `exact`): add_audio() puts the samples into the audio memory
(media/audio_memory.py: 2 s chunks, the most recent `max_seconds` kept, oldest dropped first); a
chunk is featurised and hashed once, the first time a context needs it; a trailing chunk shorter
than 2 s is part of the next answer at its true length and replaced by the sealed chunk later
(like the padded odd frame). The `fast` policy refuses audio for now (UserInputError naming the
policy): its in-place KV edits know only video patches.

Context = system, one user turn holding the retained patches as one video block in time order
(temporal positions follow the patches' real timestamps) or, with audio, the retained frames and
audio interleaved on one timeline as TMRoPE's audio-in-video block (sessions/live_media.py), the
conversation history (answer ids + end-of-turn tokens), the question. Policy `exact`: each ask is a fresh request over exactly
that sequence; the prefix cache reuses the longest unchanged KV prefix and recomputes from the
first changed patch, the encoder cache keeps every retained patch encoded once. The answer
equals a fresh run over the same retained frames and audio. Policy `fast` (opt-in): the session owns its
KV and edits it in place (evicted patches' K/V removed, new patches computed into place,
positions kept, nothing recomputed; see live_kv.py); answers diverge from `exact`, by an amount
`omnistream bench stream` measures.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from omnistream.engine.protocol import EngineRequest, RequestOutput, Retain
from omnistream.engine.sampling import SamplingParams
from omnistream.errors import ConfigError, MediaError, UserInputError
from omnistream.media.audio import AudioClip
from omnistream.media.audio_items import audio_items
from omnistream.media.audio_memory import AudioChunk, AudioMemory, AudioMemoryConfig, as_samples
from omnistream.sessions.live_kv import LiveKV
from omnistream.sessions.live_media import live_block
from omnistream.media.frame_memory import FrameMemory, FrameMemoryConfig, FramePairer, TemporalPatch
from omnistream.media.hashing import compute_patch_hashes, item_hash
from omnistream.media.image import load_image
from omnistream.media.item import MediaItem
from omnistream.media.patchify import patchify
from omnistream.media.processor import check_pixel_count
from omnistream.media.resize import VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS, resize_frames, smart_resize
from omnistream.models.literal_text import encode_turn, render_and_encode
from omnistream.models.prompt import block_kind, expand_placeholders
from omnistream.sessions.session import PendingAnswer, Session

if TYPE_CHECKING:
    from omnistream.entrypoints.api import Engine

log = logging.getLogger(__name__)

POLICIES = ("exact", "fast")
_STOP = object()  # queue sentinel: the worker ends
_AUDIO = object()  # queue marker: audio arrived (already in the audio memory): prefill after it
# A worker with nothing to ingest for this long ends (the next frame starts another): a live
# session dropped without close() holds no thread, so it and its engine can be collected.
WORKER_IDLE_S = 2.0
_PREFILL = SamplingParams(max_new_tokens=1, ignore_eos=True)  # a forward that only fills the KV


@dataclass
class LiveMetrics:
    """Seed 004's per-question metrics. Encoding and prefill count the work this question
    caused (frames that arrived since the last prefill), not the whole context."""

    total_latency: float
    encoding_latency: float
    prefill_latency: float
    generation_latency: float
    frames_encoded: int
    frames_in_context: int  # retained frames the answer saw (a padded trailing frame counts once)
    visual_tokens: int
    kv_cache_length: int
    policy: str
    star_size: int
    stream_size: int
    compression_ratio: float
    audio_tokens: int = 0  # retained audio the answer heard
    audio_seconds: float = 0.0


@dataclass
class LivePatch:
    """A retained temporal patch. Its model input is computed once, the first time a context
    needs it: under a fast backlog most patches leave the Stream before that and cost nothing."""

    patch: TemporalPatch
    padded: bool = False  # a trailing odd frame repeated (not in the frame memory)
    rows: torch.Tensor | None = None  # (gh * gw, 3 * 2 * 14 * 14) uint8 raw, checkpoint row layout
    hash: str | None = None  # patch hash (encoder-cache key)


class LiveSession(Session):
    def __init__(self, engine: "Engine", session_id: str, system: str | None, tenant: str | None,
                 kv_budget_tokens: int | None, memory: FrameMemoryConfig, min_pixels: int | None,
                 max_pixels: int | None, prefill_on_arrival: bool = True, policy: str = "exact",
                 audio_memory: AudioMemoryConfig | None = None) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"unknown live KV policy {policy!r}; choose one of {', '.join(POLICIES)}")
        super().__init__(engine, session_id, system, tenant, kv_budget_tokens)
        self.policy = policy
        self.kv = LiveKV(engine, session_id, tenant) if policy == "fast" else None
        self.memory = FrameMemory(memory)
        self.pairer = FramePairer(memory)
        self.audio = AudioMemory(audio_memory)
        self._audio_inputs: dict[tuple[int, int], MediaItem | None] = {}  # chunk key -> its 1-chunk item
        check_pixel_count("max_pixels", max_pixels)  # 0 or negative is an error, not "the default"
        check_pixel_count("min_pixels", min_pixels)
        self.max_pixels = VIDEO_MAX_PIXELS if max_pixels is None else max_pixels
        self.min_pixels = min(VIDEO_MIN_PIXELS, self.max_pixels) if min_pixels is None else min_pixels
        if self.min_pixels > self.max_pixels:
            raise ConfigError(f"min_pixels {self.min_pixels} is above max_pixels {self.max_pixels}")
        self.prefill_on_arrival = prefill_on_arrival
        self.size: tuple[int, int] | None = None  # (h, w) every frame is resized to
        self.patches: dict[int, LivePatch] = {}  # retained patches by id
        self.history_ids: list[int] = []  # turns after the video turn, as token ids
        self._state = threading.Lock()  # guards memory/patches between worker and ask
        self._queue: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self._error: Exception | None = None  # a worker fault, raised once by the next flush/ask
        self._intake = threading.Lock()  # add_frame callers: timestamps checked in arrival order
        self._last_ts = -math.inf
        self._padded: LivePatch | None = None  # the trailing odd frame, repeated (replaced by its pair)
        self._stopping = False  # close() has begun
        self._item: tuple[tuple[int, ...], MediaItem] | None = None  # last video item built
        self._block: tuple[tuple, list[MediaItem]] | None = None  # last context media block built
        self._prefix_cache: tuple[list[MediaItem], tuple] | None = None  # its prefix tokens
        self.frames_received = 0
        self.frames_encoded_total = 0
        self._asking = 0  # questions waiting for ingestion: the worker leaves prefill to them
        # held while a question builds and runs its context, and while the worker prefills: the
        # session's KV state (pinned prefix, fast policy's owned KV) has one writer at a time.
        # The worker only tries it: ingestion never waits for a running answer.
        self._context = threading.Lock()

    # ------------------------------------------------------------------ ingestion
    def add_frame(self, frame, timestamp: float) -> None:
        """Queues one frame (PIL, numpy HWC, tensor); never waits for a running answer. A frame
        that cannot be used, or a timestamp before the previous one, raises MediaError for this
        call alone: the session goes on with the frames it has."""
        self._check_open()
        if self._stopping:
            raise UserInputError(f"session {self.id} is closed")
        img = load_image(frame)  # (H, W, 3) uint8; raises MediaError
        ts = float(timestamp)
        with self._intake:
            if not math.isfinite(ts) or ts < self._last_ts:
                raise MediaError(f"timestamp {timestamp} must be finite and not before the previous one ({self._last_ts})")
            self._last_ts = ts
            self.frames_received += 1
            self._queue.put((img, ts))
            if self._worker is None:  # none yet, or it left when idle
                self._worker = threading.Thread(target=self._work, name=f"live-{self.id}", daemon=True)
                self._worker.start()

    def add_frames(self, frames, timestamps) -> None:
        if len(frames) != len(timestamps):
            raise UserInputError(f"{len(frames)} frames but {len(timestamps)} timestamps")
        for f, t in zip(frames, timestamps):
            self.add_frame(f, t)

    def add_audio(self, samples, timestamp: float, sampling_rate: int = 16000) -> None:
        """Adds sound: `samples` 1-D float in [-1, 1] or int16 PCM, `timestamp` the seconds of
        the first sample on add_frame's clock. Kept in the audio memory at once (cheap); the
        worker prefills after it like after a frame. Unusable samples or a timestamp before the
        end of the audio so far raise MediaError for this call alone; a model that does not hear
        and the `fast` policy refuse with UserInputError."""
        self._check_open()
        if self._stopping:
            raise UserInputError(f"session {self.id} is closed")
        if self.kv is not None:
            raise UserInputError("the live 'fast' KV policy does not take audio yet; use policy='exact'")
        config = self.engine._audio_config()  # refuses a model that does not hear
        x = as_samples(samples, sampling_rate, config)
        ts = float(timestamp)
        with self._intake:
            with self._state:
                self.audio.push(x, ts)  # raises MediaError (timestamp); drops the oldest chunks past the bound
            self._queue.put(_AUDIO)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name=f"live-{self.id}", daemon=True)
                self._worker.start()

    def flush(self, timeout: float | None = None) -> None:
        """Waits until every queued frame is ingested (and prefilled when the policy says so)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("live ingestion did not catch up in time")
            time.sleep(0.002)
        self._raise_worker_error()

    def _raise_worker_error(self) -> None:
        err, self._error = self._error, None
        if err is not None:
            raise err

    def _work(self) -> None:
        dirty = False  # retained patches changed since the last prefill
        while True:
            try:
                batch = [self._queue.get(timeout=WORKER_IDLE_S)]
            except queue.Empty:
                with self._intake:  # add_frame starts a new worker after this one has left
                    if self._queue.empty():
                        self._worker = None
                        return
                continue
            while True:  # drain the backlog: one prefill for many frames
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(x is _STOP for x in batch)
            try:
                if not stop:
                    dirty = any([x is _AUDIO or self._ingest(*x) for x in batch]) or dirty
                # prefill once the burst is over, and never ahead of a waiting question (it
                # builds the same context itself; the worker would only delay it)
                if (dirty and not stop and self.prefill_on_arrival and not self._stopping and self._queue.empty()
                        and not self._asking and self._context.acquire(blocking=False)):
                    try:
                        dirty = False
                        self._prefill_prefix()
                    finally:
                        self._context.release()
            except Exception as e:  # noqa: BLE001 - reported once to the next caller; the session goes on
                log.warning("live session %s: ingestion failed: %s", self.id, e)
                self._error = e if isinstance(e, UserInputError) else MediaError(f"live ingestion failed: {e}")
            finally:
                for _ in batch:
                    self._queue.task_done()
            if stop:
                return

    def _ingest(self, frame, timestamp: float) -> bool:
        """One frame through resize -> pairing -> frame memory; True when retained patches changed."""
        img = load_image(frame)  # (H, W, 3) uint8
        if self.size is None:
            self.size = smart_resize(img.shape[0], img.shape[1], min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        small = img if img.shape[:2] == self.size else resize_frames(img[None], *self.size)[0]
        patch = self.pairer.push(small, timestamp)
        if patch is None:
            return False
        with self._state:
            self._padded = None  # its pair arrived: the real patch replaces it
            result = self.memory.add_patch(patch)
            for pid in result.removed:
                self.patches.pop(pid, None)
            kept = {p.patch_id for p in self.memory.retained()}
            if patch.patch_id in kept:
                self.patches[patch.patch_id] = LivePatch(patch)
        return patch.patch_id in kept or bool(result.removed)

    def _materialize(self, lp: LivePatch) -> LivePatch:
        """Patchify and hash a retained patch (once). Rows stay uint8: a quarter of the bytes to
        hash and to copy; the model runner normalises them on the device."""
        if lp.rows is None:
            frames = torch.from_numpy(np.stack(lp.patch.frames)).permute(0, 3, 1, 2)  # (2, 3, H, W) uint8
            rows, _ = patchify(frames)
            [lp.hash] = compute_patch_hashes(rows, (1, self.size[0] // 14, self.size[1] // 14), model_key=self.engine.processor.model_key)
            lp.rows = rows
        return lp

    # ------------------------------------------------------------------ context
    def video_item(self) -> MediaItem | None:
        """The retained patches as one video block (time order, real timestamps), the trailing
        odd frame included (padded)."""
        live = self._context_patches()
        key = tuple(_kv_key(lp) for lp in live)  # a padded frame differs from its real patch
        cached = self._item
        if cached is not None and cached[0] == key:  # unchanged since the last context: no copy
            return cached[1]
        if not live:
            return None
        item = self._item_of(live)
        self._item = (key, item)
        return item

    def context_media(self) -> list[MediaItem]:
        """The items of the context's media block: the video item alone, or, with audio, the
        retained frames and audio interleaved on one timeline (sessions/live_media.py)."""
        video = self.video_item()
        audio = self._audio_context()
        key = (self._item[0] if video is not None else None, tuple(c.key for c, _ in audio))
        cached = self._block
        if cached is not None and cached[0] == key:
            return cached[1]
        model = self.engine.model
        items = live_block(video, [(c.start, item) for c, item in audio], getattr(model, "position_id_per_seconds", 25),
                           getattr(model, "seconds_per_chunk", 2))
        self._block = (key, items)
        return items

    def _audio_context(self) -> list[tuple[AudioChunk, MediaItem]]:
        """Retained audio chunks with their items (featurised and hashed once per chunk; a
        chunk too short for one token is left out)."""
        with self._state:
            chunks, known = self.audio.retained(), self._audio_inputs
        items = {c.key: known[c.key] if c.key in known else self._audio_item(c) for c in chunks}
        with self._state:
            self._audio_inputs = items  # only what is retained now: dropped chunks and old snapshots go
        return [(c, items[c.key]) for c in chunks if items[c.key] is not None]

    def _audio_item(self, chunk: AudioChunk) -> MediaItem | None:
        config = self.engine._audio_config()
        if chunk.samples.shape[0] < config.min_samples:
            return None
        items = audio_items(AudioClip(chunk.samples, config.sampling_rate, config.sampling_rate), config,
                            model_key=self.engine.processor.model_key)
        return items[0] if len(items) == 1 else None

    def _context_patches(self) -> list[LivePatch]:
        """The patches an answer sees now: the retained ones, then the padded odd frame."""
        with self._state:
            live = [self.patches[p.patch_id] for p in self.memory.retained() if p.patch_id in self.patches]
            pending = self.pairer.pending_frame()
            if pending is not None:
                if self._padded is None or self._padded.patch.timestamps[0] != pending[1]:
                    self._padded = LivePatch(self.pairer.padded_patch(), padded=True)
                live.append(self._padded)
        return live

    def _item_of(self, live: list[LivePatch]) -> MediaItem:
        """Retained patches (time order) as one video item: real timestamps, per-patch hashes."""
        live = [self._materialize(lp) for lp in live]
        times = [lp.patch.timestamps[0] for lp in live]
        hashes = [lp.hash for lp in live]
        rows = live[0].rows if len(live) == 1 else torch.cat([lp.rows for lp in live])
        return MediaItem(
            kind="video", pixel_values=rows, grid_thw=(len(live), self.size[0] // 14, self.size[1] // 14),
            timestamps=[t for lp in live for t in lp.patch.timestamps], patch_times=times,
            patch_hashes=hashes, content_hash=item_hash("video", hashes, patch_times=times),
        )

    def _prefix(self, items: list[MediaItem]) -> tuple[list[int], list[tuple[int, MediaItem]]]:
        """Tokens of system + the media turn, and each item's placeholder offset."""
        if self._prefix_cache is not None and self._prefix_cache[0] is items:
            return self._prefix_cache[1]
        self._prefix_cache = (items, self._build_prefix(items))
        return self._prefix_cache[1]

    def _build_prefix(self, items: list[MediaItem]) -> tuple[list[int], list[tuple[int, MediaItem]]]:
        tok = self.engine.tokenizer
        _, ids = render_and_encode(tok, self._base_messages(block_kind(items)), add_generation_prompt=False)
        ids, ranges = expand_placeholders(ids, items, image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
                                          audio_token_id=tok.audio_token_id, audio_start_token_id=tok.audio_start_token_id,
                                          audio_end_token_id=tok.audio_end_token_id)
        return ids, [(r.offset, item) for r, item in zip(ranges, items)]

    def _base_messages(self, kind: str = "video") -> list[dict[str, Any]]:
        system = [m for m in self.messages[:1] if m["role"] == "system"]
        return system + [{"role": "user", "content": [{"type": kind, kind: "live"}]}]

    def _prefill_prefix(self) -> None:
        if self.kv is not None:
            self._sync_kv()
            return
        items = self.context_media()
        if not items:
            return
        ids, media = self._prefix(items)
        self.engine.submit(EngineRequest(ids, media, _PREFILL, cache_salt=self.tenant,
                                         retain=Retain(self.id, self.kv_budget_tokens))).result()
        self.token_ids, self.media, self._names = ids, media, []

    # ------------------------------------------------------------------ asking
    def start(self, question: str, sampling: SamplingParams | None = None, *, return_logits: bool = False,
              logprobs: int | None = None) -> PendingAnswer:
        """Answers over every frame added before this call (waits for them to pass the frame
        memory; TTFT counts from here). Frames added meanwhile do not change this answer, and
        keep being ingested while it streams. ask() / ask_stream() (Session's) are this; the
        result's `.live` holds the LiveMetrics."""
        self._check_open()
        asked = time.perf_counter()
        self._asking += 1
        try:
            self.flush()
        finally:
            self._asking -= 1
        self._context.acquire()  # released by the answer's finish() / abort()
        try:
            self._check_open()
            if self._stopping:
                raise UserInputError(f"session {self.id} is closed")
            sampling = sampling or SamplingParams()
            start = self._start_fast if self.kv is not None else self._start_exact
            handle, commit = start(question, sampling, return_logits, logprobs, asked)
        except BaseException:
            self._context.release()
            raise
        return PendingAnswer(handle, commit, self._context.release)

    def _start_exact(self, question: str, sampling: SamplingParams, return_logits: bool, logprobs: int | None, asked: float):
        items = self.context_media()  # snapshot: media ingested later does not change this answer
        if not items:
            raise UserInputError("no frames or audio added yet: add some before asking")
        prompt, media = self.prompt_for(question, items)
        prefix_len = len(self._prefix(items)[0])
        memory = self._memory_snapshot()
        new_audio = _new_audio_tokens(media, self.media)  # encoded by this question (not in the last context)
        before = self.engine.vision_tokens_encoded
        handle = self.engine.submit(EngineRequest(
            prompt, media, sampling, cache_salt=self.tenant, retain=Retain(self.id, self.kv_budget_tokens),
            return_logits=return_logits, logprobs=logprobs, arrival=asked))

        def commit(res: RequestOutput) -> RequestOutput:
            self.history_ids = prompt[prefix_len:] + res.token_ids + self._end_of_turn(res.token_ids)
            self._add_turn(question, res.text)
            self.token_ids, self.media, self._names = prompt + res.token_ids, media, []
            encoded = max(0, self.engine.vision_tokens_encoded - before - new_audio)  # vision tokens
            res.live = self._metrics(res, asked, encoded, items, res.metrics.prompt_tokens + res.metrics.output_tokens, memory)
            return res

        return handle, commit

    def prompt_for(self, question: str, items: list[MediaItem] | None = None):
        """(ids, media) of the `exact` context for `question`: system, media block, history, question."""
        items = items or self.context_media()
        prefix, media = self._prefix(items)
        return prefix + self.history_ids + self._question_ids(question), media

    def _question_ids(self, question: str) -> list[int]:
        """The user turn + assistant header, as the template renders it after the history."""
        tok = self.engine.tokenizer
        history = self._base_messages() + self.messages[1 if self.messages and self.messages[0]["role"] == "system" else 0:]
        return encode_turn(tok, history, [{"role": "user", "content": question}])

    # ------------------------------------------------------------------ policy fast
    def _sync_kv(self) -> None:
        """Brings the owned KV to the context's patches: evicted ones (and a padded frame whose
        pair arrived) removed, new ones computed at the end of the video block (policy fast)."""
        live = self._context_patches()
        if not live:
            return
        try:
            if not self.kv.built:
                item = self.video_item()
                ids, media = self._prefix([item])
                self.kv.build(ids, media[0], [_kv_key(lp) for lp in live])
                return
            keep = {_kv_key(lp) for lp in live}
            for key in [k for k in self.kv.spans if k not in keep]:
                self.kv.remove(key)
            self.kv.insert([(_kv_key(lp), self._patch_item(lp)) for lp in live if _kv_key(lp) not in self.kv.spans])
        except Exception:
            # an edit failed half-way (e.g. the KV pool is full): give the owned KV back; the
            # next question rebuilds it from the retained frames (its history is not kept)
            self.kv.close()
            self.kv = LiveKV(self.engine, self.id, self.tenant)
            raise

    def _patch_item(self, lp: LivePatch) -> MediaItem:
        """One retained patch as a 1-patch video item (its own timestamps and hash)."""
        return self._item_of([lp])

    def _start_fast(self, question: str, sampling: SamplingParams, return_logits: bool, logprobs: int | None, asked: float):
        before = self.engine.vision_tokens_encoded
        edits = (self.kv.edit_vision_s, self.kv.edit_prefill_s)
        self._sync_kv()  # the new frames this question waited for: encoded and computed into place
        if not self.kv.built:
            raise UserInputError("no frames added yet: add frames before asking")
        edit_vision, edit_prefill = self.kv.edit_vision_s - edits[0], self.kv.edit_prefill_s - edits[1]
        memory = self._memory_snapshot()
        handle, append = self.kv.start_ask(self._question_ids(question), self._end_of_turn, sampling,
                                           return_logits=return_logits, logprobs=logprobs, arrival=asked)

        def commit(res: RequestOutput) -> RequestOutput:
            append(res)
            res.metrics.vision_encode_s += edit_vision
            res.metrics.prefill_s += edit_prefill
            self._add_turn(question, res.text)
            encoded = self.engine.vision_tokens_encoded - before
            res.live = self._metrics(res, asked, encoded, None, len(self.kv.ids), memory)
            return res

        return handle, commit

    def _add_turn(self, question: str, answer: str) -> None:
        self.messages = self.messages + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        self.turns += 1

    def _memory_snapshot(self):
        """(frame-memory stats, padded trailing frame?) as the answer sees them: frames that
        arrive while it streams change the memory, not this answer's metrics."""
        with self._state:
            return self.memory.stats(), self._padded is not None

    def _metrics(self, res: RequestOutput, asked: float, vision_tokens: int, items: list[MediaItem] | None, kv_length: int,
                 memory: tuple) -> LiveMetrics:
        m = res.metrics
        stats, padded = memory
        per_patch = (self.size[0] // 28) * (self.size[1] // 28) if self.size else 1
        visual = sum(i.num_tokens for i in items if i.kind == "video") if items is not None else self.kv.visual_tokens
        heard = [i for i in items or () if i.kind == "audio"]
        now = time.perf_counter()
        return LiveMetrics(
            total_latency=now - asked, encoding_latency=m.vision_encode_s, prefill_latency=m.prefill_s,
            generation_latency=max(0.0, now - asked - (m.ttft_s or 0.0)), frames_encoded=2 * vision_tokens // per_patch,
            frames_in_context=2 * (visual // per_patch) - (1 if padded else 0), visual_tokens=visual,
            kv_cache_length=kv_length, policy=self.policy, star_size=stats.star_size, stream_size=stats.stream_size,
            compression_ratio=stats.compression_ratio, audio_tokens=sum(i.num_tokens for i in heard),
            audio_seconds=sum(i.grid_thw[1] for i in heard) / 100.0,  # mel frames of 10 ms
        )

    def close(self) -> None:
        """Stops the worker (its queued frames are dropped), frees the frames and the KV."""
        if self.closed or self._stopping:
            return
        self._stopping = True  # the worker stops prefilling; add_frame/ask refuse from now on
        with self._intake:
            worker = self._worker
            if worker is not None:
                self._queue.put(_STOP)
        if worker is not None and threading.current_thread() is not worker:
            worker.join()
        with self._context:  # not in the middle of a question
            if self.kv is not None:
                self.kv.close()
            with self._state:
                self.patches.clear()
                self.audio.clear()
                self._audio_inputs.clear()
                self._padded, self._item, self._block, self._prefix_cache = None, None, None, None
            super().close()


def _new_audio_tokens(media: list[tuple[int, MediaItem]], before: list[tuple[int, MediaItem]]) -> int:
    """Audio tokens of `media` whose chunk was not in the previous context (so were encoded now)."""
    seen = {h for _, m in before if m.kind == "audio" for h in m.patch_hashes or ()}
    return sum(m.num_tokens for _, m in media if m.kind == "audio" and not set(m.patch_hashes or ()) <= seen)


def _kv_key(lp: LivePatch) -> float:
    """Key of a patch in the fast policy's KV: its id; a padded odd frame sits between the
    newest patch and the id its real patch will get (inserted after every real patch, removed
    when its pair arrives)."""
    return lp.patch.patch_id - 0.5 if lp.padded else lp.patch.patch_id
