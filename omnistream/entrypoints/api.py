"""Offline Python API.

    engine = Engine.from_pretrained("demo")            # or a local checkpoint directory
    [res] = engine.generate([[{"role": "user", "content": [
        {"type": "video", "video": "clip.mp4", "fps": 2.0},
        {"type": "text", "text": "What happens?"}]}]], SamplingParams(max_new_tokens=64))
    res.text, res.token_ids, res.metrics

A conversation is a list of chat messages; content parts may be text, image (path, PIL image,
array), video (path, or {"frames": [...], "timestamps": [...]}; with "use_audio_in_video": true
also the file's audio track) or, for models that hear (Qwen2.5-Omni), audio (path, or {"array":
samples, "sampling_rate": hz}). Media is decoded and preprocessed here, before the request
reaches the engine loop.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from omnistream.config import EngineConfig
from omnistream.engine.build_queue import BuildQueue
from omnistream.engine.build import MAX_VISION_PATCHES, ModelRecipe, build_llm, build_model, checkpoint_model  # noqa: F401 - MAX_VISION_PATCHES, build_model: re-exported
from omnistream.engine.core import EngineCore
from omnistream.engine.handle import PreparedRequest, RequestHandle
from omnistream.engine.protocol import EngineRequest, RequestOutput
from omnistream.engine.sampling import SamplingParams
from omnistream.errors import ConfigError, UnknownSessionError, UserInputError
from omnistream.media.audio_items import load_audio_source
from omnistream.media.item import MediaItem
from omnistream.media.processor import MediaProcessor
from omnistream.models.builtin import builtin_model_dir
from omnistream.models.demo import is_random_weights
from omnistream.models.interface import MultimodalLM
from omnistream.models.prompt import build_prompt
from omnistream.models.tokenizer import Tokenizer
from omnistream.sessions.session import Session

log = logging.getLogger(__name__)
T = TypeVar("T")

LIVE_ENCODER_CACHE_BYTES = 256 << 20  # per vision forward; longer videos are encoded in slices (lossless)


GenerationResult = RequestOutput  # what generate(), run() and sessions return


class Engine:
    """The Python API: media -> prompt -> the engine core (one loop shared by every caller,
    engine/core.py) -> results. Thread-safe: generate(), submit(), sessions and live sessions
    may be used from any number of threads at once; their requests batch together."""

    def __init__(self, cfg: EngineConfig, model_dir: Path, model: MultimodalLM, tokenizer: Tokenizer,
                 recipe: ModelRecipe | None = None) -> None:
        """`model` holds the weights, on cfg.device; with cfg.engine_process it is the
        front-end's copy for positions and config only (the meta device is enough) and the
        engine process builds its own from `recipe` (Engine.from_pretrained and
        bench.models.make_engine give both)."""
        self.cfg = cfg
        self.model_dir = model_dir
        self.model = model
        self.tokenizer = tokenizer
        self.processor = MediaProcessor(model_key=f"{Path(model_dir).resolve()}|{cfg.torch_dtype}",
                                        pin_memory=not cfg.engine_process)  # items hashed once, here
        self.device = torch.device(cfg.device)
        self.random_weights = is_random_weights(model_dir)
        # a session's id starts with this; a cluster replica puts its own name in it, so the
        # id says which replica holds the session (omnistream/cluster/placement.py)
        self.session_id_prefix = "s-"
        self._sessions: dict[str, Session] = {}
        self._sessions_lock = threading.Lock()
        # held while a request is built and queued (submit(), build_and_send(); sessions hold it
        # over their prompt's rendering too). Under the interpreter lock, concurrent builds advance
        # round-robin: a burst of 64 questions all finished building at ~56 ms (H200 host, 3B),
        # the engine idle until then; one at a time, the first is queued after one build and runs
        # at once, and the caller that leads the BuildQueue runs the builds queued behind it
        self.submit_lock = threading.RLock()
        self.builds = BuildQueue(self.submit_lock)  # a burst's builds run back to back (engine/build_queue.py)
        self.block_size = cfg.cache.block_size
        self.max_context = model.max_context  # tokens of prompt + answer the model takes
        if cfg.engine_process:
            if recipe is None:
                raise ConfigError("engine_process: the engine process builds the model itself; give a recipe "
                                  "(Engine.from_pretrained and bench.models.make_engine do)")
            from omnistream.engine.remote_core import RemoteCore

            self.core = RemoteCore(cfg, recipe, model, tokenizer.decode)
            self.llm = None  # in the engine process: reach it through named operations (engine/ops.py)
            self.kv_pool_tokens = self.core.factory.kv_pool_tokens
        else:
            llm = build_llm(model, cfg)
            self.core = EngineCore(llm, tokenizer.decode)
            self.llm = llm  # for tests and tools that inspect state; only the core's loop mutates it
            self.kv_pool_tokens = llm.blocks.num_blocks * llm.blocks.block_size
        # long-lived objects (weights, tokenizer tables) out of the collector's way: a full
        # collection during a follow-up question would cost more than the question
        gc.collect()
        gc.freeze()

    @classmethod
    def from_pretrained(cls, model: str | Path = "demo", *, device: str = "cpu", dtype: str = "auto", **options) -> "Engine":
        model_dir = builtin_model_dir(model)  # "demo", "omni-demo": built once into the cache
        if not (model_dir / "config.json").is_file():
            raise ConfigError(f"{model_dir}: not a checkpoint directory (no config.json)")
        cfg = EngineConfig.from_kwargs(str(model_dir), device=device, dtype=dtype, **options)
        recipe = ModelRecipe(checkpoint_model, (model_dir,))
        # in process mode the weights are read by the engine process only
        net = checkpoint_model(model_dir, cfg, "meta") if cfg.engine_process else recipe(cfg)
        engine = cls(cfg, model_dir, net, Tokenizer(model_dir), recipe)
        if engine.random_weights:
            log.warning("%s holds RANDOM weights: outputs are meaningless text", model_dir)
        return engine

    # ------------------------------------------------------------------ core
    def submit(self, request: EngineRequest) -> RequestHandle:
        """Queues one request on the engine loop; the handle streams its output (iterate it, or
        `async for`), `result()` waits for the end. Raises BudgetError at once for a request
        that can never fit."""
        return self.build_and_send(lambda: (None, self.core.prepare(request)))[1]

    def build_and_send(self, build: Callable[[], tuple[T, PreparedRequest]]) -> tuple[T, RequestHandle]:
        """Runs `build` (-> anything, a prepared request) ordered with every other caller's
        build, possibly in another caller's thread, and sends the request at once -> (anything,
        its handle). Raises what `build` raised. Sessions build their prompts this way."""
        def job() -> tuple[T, RequestHandle]:
            extra, prepared = build()
            return extra, self.send(prepared)

        # a caller interrupted after its request was sent (by another caller's thread): aborted
        return self.builds.run(job, abandoned=lambda done: done[1].abort())

    def prepare(self, request: EngineRequest) -> PreparedRequest:
        """submit()'s build and checks (raises as submit does), under submit_lock; send()
        queues what it returns. Callers whose own work before the build should be ordered with
        it (sessions: their prompt's rendering) pass both to build_and_send()."""
        with self.submit_lock:
            return self.core.prepare(request)

    def send(self, prepared: PreparedRequest) -> RequestHandle:
        """Queues a prepared request -> its handle (an engine process's request: pickled here
        when small, by its sender thread when it carries large tensors)."""
        return self.core.send(prepared)

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)

    def run(self, requests: list[EngineRequest]) -> list[GenerationResult]:
        """Submits every request (they batch together) and waits for all of them. If one
        fails, the others still run to the end; then its error is raised."""
        handles, error = [], None
        for r in requests:
            handles.append(self.submit(r))
        results = []
        for h in handles:
            try:
                results.append(h.result())
            except Exception as e:  # noqa: BLE001 - raised once every other request is done
                error = error or e
        if error is not None:
            raise error
        return results

    def close(self) -> None:
        """Ends every session and stops the engine loop (requests in flight end with an error)."""
        for s in list(self._sessions.values()):
            s.close()
        self.core.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ inputs
    def load_media(self, messages: list[dict]) -> list[MediaItem]:
        """Decodes and preprocesses every image/video part, in message order."""
        items = []
        for msg in messages:
            content = msg.get("content")
            if isinstance(content, str) or content is None:
                continue
            for part in content:
                kind = part.get("type")
                if kind == "image":
                    items.append(self.processor.process_image(
                        part.get("image", part.get("path")),
                        min_pixels=part.get("min_pixels"), max_pixels=part.get("max_pixels")))
                elif kind == "video":
                    src = part.get("video", part.get("path"))
                    if isinstance(src, dict):  # {"frames": [...], "timestamps": [...]}
                        src, stamps = src["frames"], src.get("timestamps")
                    else:
                        stamps = part.get("timestamps")
                    video = self.processor.process_video(
                        src, fps=part.get("fps"), nframes=part.get("nframes"),
                        min_pixels=part.get("min_pixels"), max_pixels=part.get("max_pixels"), timestamps=stamps)
                    if part.get("vad"):
                        raise UserInputError('"vad" applies to audio parts: it would put a video\'s audio off its frames\' clock')
                    items += self._with_audio_track(video, src) if part.get("use_audio_in_video") else [video]
                elif kind == "audio":
                    src = part.get("audio", part.get("path"))
                    if part.get("vad"):  # opt-in, lossy: silent stretches dropped (media/vad.py)
                        from omnistream.media.vad import vad_source

                        src, _ = vad_source(src, self._audio_config())
                    items += load_audio_source(src, self._audio_config(), model_key=self.processor.model_key)
                elif kind not in ("text", None):
                    raise UserInputError(f"unsupported content part type {kind!r}")
        return items

    def _audio_config(self):
        """The features the model's audio encoder takes; a model that does not hear refuses."""
        config = getattr(self.model, "audio_config", None)
        if config is None:
            raise UserInputError(f"{self.model_dir.name} does not take audio (a Qwen2.5-Omni checkpoint does)")
        return config

    def _with_audio_track(self, video: MediaItem, src) -> list[MediaItem]:
        """use_audio_in_video: the file's audio track interleaved with its frames (one block)."""
        config = self._audio_config()
        if not isinstance(src, (str, Path)):
            raise UserInputError("use_audio_in_video needs a video file (its audio track is read from it)")
        audio = load_audio_source(src, config, model_key=self.processor.model_key)
        return self.model.interleave_media(video, audio, uuid.uuid4().hex)

    # ------------------------------------------------------------------ generate
    def generate(self, conversations, sampling: SamplingParams | None = None, *, return_logits: bool = False,
                 tenant: str | None = None, logprobs: int | None = None) -> list[GenerationResult]:
        """Runs every conversation to completion, batched by the scheduler."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self.run([self.request_for(m, sampling, return_logits=return_logits, tenant=tenant, logprobs=logprobs)
                         for m in conversations])

    def request_for(self, messages: list[dict], sampling: SamplingParams | None = None, *, return_logits: bool = False,
                    tenant: str | None = None, logprobs: int | None = None) -> EngineRequest:
        """Decodes and preprocesses the conversation's media (this thread) -> an EngineRequest."""
        arrival = time.perf_counter()
        items = self.load_media(messages)
        prompt = build_prompt(self.tokenizer, messages, items)
        return EngineRequest(
            token_ids=prompt.token_ids, media=[(r.offset, m) for r, m in zip(prompt.ranges, prompt.media)],
            sampling=sampling or SamplingParams(), cache_salt=tenant, return_logits=return_logits, logprobs=logprobs,
            arrival=arrival, media_decode_s=sum(m.decode_s for m in items),
            preprocess_s=sum(m.preprocess_s + m.hash_s for m in items),
        )

    # ------------------------------------------------------------------ sessions
    def session(self, system: str | None = None, tenant: str | None = None, kv_budget_tokens: int | None = None) -> Session:
        """A new multi-turn session (see sessions/session.py); `tenant` keeps its cache apart."""
        budget = kv_budget_tokens if kv_budget_tokens is not None else self.cfg.cache.session_kv_budget_tokens
        return self._register(Session(self, f"{self.session_id_prefix}{uuid.uuid4().hex[:12]}", system, tenant, budget))

    def live_session(self, system: str | None = None, tenant: str | None = None, *, memory=None,
                     min_pixels: int | None = None, max_pixels: int | None = None,
                     prefill_on_arrival: bool = True, kv_budget_tokens: int | None = None, policy: str = "exact",
                     audio_memory=None):
        """A session fed frame by frame, and sound by sound for models that hear (see
        sessions/live.py; audio_memory: a media.audio_memory.AudioMemoryConfig). Needs the encoder cache: one of
        LIVE_ENCODER_CACHE_BYTES is created if the engine has none."""
        from omnistream.media.frame_memory import FrameMemoryConfig
        from omnistream.sessions.live import LiveSession

        self.core.run_op("ensure_encoder_cache", LIVE_ENCODER_CACHE_BYTES)
        s = LiveSession(self, f"live-{uuid.uuid4().hex[:12]}", system, tenant, kv_budget_tokens, memory or FrameMemoryConfig(),
                        min_pixels, max_pixels, prefill_on_arrival, policy, audio_memory)
        return self._register(s)

    def _register(self, s: Session) -> Session:
        with self._sessions_lock:
            self._sessions[s.id] = s
        return s

    def _forget(self, session_id: str) -> None:
        """A session closed: it leaves the registry and the engine drops its KV."""
        with self._sessions_lock:
            self._sessions.pop(session_id, None)

    def get_session(self, session_id: str) -> Session:
        with self._sessions_lock:
            s = self._sessions.get(session_id)
        if s is None:
            raise UnknownSessionError(f"unknown session {session_id!r}")
        return s

    @property
    def vision_tokens_encoded(self) -> int:
        """Tokens the vision tower has produced so far (cache hits excluded); read without a
        round trip through the loop (core.load())."""
        return self.core.load().vision_tokens_encoded

    def discard_encoder_entries(self, keys: list[str]) -> None:
        """Drops cached media embeddings (benchmarks use it to make the next use encode again)."""
        self.core.run_op("discard_encoder_entries", list(keys))

    def stats(self, timeout: float | None = None) -> dict[str, Any]:
        """A consistent snapshot, taken by the engine loop between steps (TimeoutError when the
        loop has not answered within `timeout` s)."""
        out = self.core.run_op("stats", timeout=timeout)
        with self._sessions_lock:
            out["sessions"] = len(self._sessions)
        return out
