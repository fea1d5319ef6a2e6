"""Offline Python API.

    engine = Engine.from_pretrained("demo")            # or a local checkpoint directory
    [res] = engine.generate([[{"role": "user", "content": [
        {"type": "video", "video": "clip.mp4", "fps": 2.0},
        {"type": "text", "text": "What happens?"}]}]], SamplingParams(max_new_tokens=64))
    res.text, res.token_ids, res.metrics

A conversation is a list of chat messages; content parts may be text, image (path, PIL image,
array) or video (path, or {"frames": [...], "timestamps": [...]}). Media is decoded and
preprocessed here, before the request reaches the engine loop.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import uuid
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from omnistream.cache.budget import kv_pool_tokens
from omnistream.cache.encoder_cache import EncoderCache
from omnistream.config import EngineConfig
from omnistream.engine.llm_engine import LLMEngine
from omnistream.engine.model_runner import ModelRunner
from omnistream.engine.sampling import SamplingParams
from omnistream.errors import ConfigError, UnknownSessionError, UserInputError
from omnistream.media.item import MediaItem
from omnistream.media.processor import MediaProcessor
from omnistream.models.demo import ensure_demo_model, is_random_weights
from omnistream.models.hf_config import QwenVLConfig
from omnistream.models.loader import load_weights
from omnistream.models.qwen2_5_vl import Qwen2_5_VLModel
from omnistream.models.prompt import build_prompt
from omnistream.sessions.session import Session
from omnistream.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MAX_VISION_PATCHES = 16384
LIVE_ENCODER_CACHE_BYTES = 256 << 20  # per vision forward; longer videos are encoded in slices (lossless)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    metrics: dict[str, Any]
    logits: list[torch.Tensor] | None = None  # (vocab,) per generated token, when asked


def build_model(mcfg: QwenVLConfig, device: torch.device, dtype: torch.dtype) -> Qwen2_5_VLModel:
    """Allocates the model directly on `device` in `dtype` (weights uninitialised until loaded)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2_5_VLModel(mcfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)



@contextmanager
def _collector_paused():
    """No garbage collection inside an engine run: a full collection stalled prefills by 10-25 ms
    (measured on the H100 host, bench stream). What the run leaves is collected after it."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()

class Engine:
    def __init__(self, cfg: EngineConfig, model_dir: Path, model: Qwen2_5_VLModel, tokenizer: Tokenizer) -> None:
        self.cfg = cfg
        self.model_dir = model_dir
        self.model = model
        self.tokenizer = tokenizer
        self.processor = MediaProcessor(model_key=f"{Path(model_dir).resolve()}|{cfg.torch_dtype}")  # items hashed once, here
        self.device = torch.device(cfg.device)
        self.random_weights = is_random_weights(model_dir)
        self._sessions: dict[str, Session] = {}
        self._lock = threading.RLock()  # one engine loop at a time (live ingestion runs in threads)
        offload = None
        if cfg.offload_vision and self.device.type == "cuda":  # before sizing the KV pool
            from omnistream.engine.vision_offload import VisionOffloader

            offload = VisionOffloader(model.visual, self.device)
        per_token = ModelRunner.kv_bytes_per_token(model, cfg.torch_dtype)
        tokens = kv_pool_tokens(model.cfg, cfg, self.device, per_token, MAX_VISION_PATCHES, offload.bytes if offload else 0)
        num_blocks = tokens // cfg.cache.block_size
        stop = {model.cfg.eos_token_id, model.cfg.im_end_token_id}
        self.llm = LLMEngine(model, cfg, num_blocks, stop)
        self.llm.runner.max_vision_patches = MAX_VISION_PATCHES
        self.llm.runner.vision_offload = offload
        if cfg.cache.encoder_cache_bytes > 0:
            self.llm.runner.encoder_cache = EncoderCache(cfg.cache.encoder_cache_bytes, cfg.cache.encoder_cache_cpu_bytes)
        if self.device.type == "cuda" and cfg.cuda_graphs:
            self.llm.runner.enable_cuda_graphs(max_context=32768)
        # long-lived objects (weights, tokenizer tables) out of the collector's way: a full
        # collection during a follow-up question would cost more than the question
        gc.collect()
        gc.freeze()
        log.info("KV pool: %d blocks of %d tokens (%.2f GiB)", num_blocks, cfg.cache.block_size, num_blocks * cfg.cache.block_size * per_token / 2**30)

    @classmethod
    def from_pretrained(cls, model: str | Path = "demo", *, device: str = "cpu", dtype: str = "auto", **options) -> "Engine":
        model_dir = ensure_demo_model() if str(model) == "demo" else Path(model)
        if not (model_dir / "config.json").is_file():
            raise ConfigError(f"{model_dir}: not a checkpoint directory (no config.json)")
        cfg = EngineConfig.from_kwargs(str(model_dir), device=device, dtype=dtype, **options)
        mcfg = QwenVLConfig.from_dir(model_dir)
        net = build_model(mcfg, torch.device(device), cfg.torch_dtype)
        load_weights(net, model_dir)
        engine = cls(cfg, model_dir, net, Tokenizer(model_dir))
        if engine.random_weights:
            log.warning("%s holds RANDOM weights: outputs are meaningless text", model_dir)
        return engine

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
                    items.append(self.processor.process_video(
                        src, fps=part.get("fps"), nframes=part.get("nframes"),
                        min_pixels=part.get("min_pixels"), max_pixels=part.get("max_pixels"), timestamps=stamps))
                elif kind not in ("text", None):
                    raise UserInputError(f"unsupported content part type {kind!r}")
        return items

    # ------------------------------------------------------------------ generate
    def generate(self, conversations, sampling: SamplingParams | None = None, *, return_logits: bool = False, tenant: str | None = None) -> list[GenerationResult]:
        """Runs every conversation to completion, batched by the scheduler."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = []
        for messages in conversations:
            arrival = time.perf_counter()
            items = self.load_media(messages)
            prompt = build_prompt(self.tokenizer, messages, items)
            media = [(r.offset, m) for r, m in zip(prompt.ranges, prompt.media)]
            costs = (sum(m.decode_s for m in items), sum(m.preprocess_s + m.hash_s for m in items))
            prompts.append((prompt.token_ids, media, costs, arrival))
        return self.run_prompts(prompts, sampling, return_logits=return_logits, cache_salt=tenant)

    def run_prompts(self, prompts, sampling: SamplingParams | None = None, *, return_logits: bool = False,
                    cache_salt: str | None = None, known_hashes: list[bytes] | None = None, kv=None) -> list[GenerationResult]:
        """prompts: (token_ids, [(offset, MediaItem)], (decode_s, preprocess_s)[, arrival]).
        known_hashes: prefix-cache names already computed for a prefix of every prompt.
        kv: a KVHandle (engine/request.py) the one prompt continues (live policy `fast`)."""
        if kv is not None and len(prompts) != 1:
            raise ValueError("a KV handle continues exactly one prompt")
        with self._lock, _collector_paused():
            return self._run_prompts(prompts, sampling or SamplingParams(), return_logits, cache_salt, known_hashes, kv)

    def _run_prompts(self, prompts, sampling: SamplingParams, return_logits: bool, cache_salt: str | None, known_hashes, kv=None) -> list[GenerationResult]:
        self.llm.runner.keep_logits = return_logits
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        requests = []
        for p in prompts:
            ids, media, (decode_s, preprocess_s) = p[0], p[1], p[2]
            arrival = p[3] if len(p) > 3 else time.perf_counter() - decode_s - preprocess_s
            req = self.llm.add_request(ids, media, sampling, cache_salt=cache_salt, known_hashes=known_hashes, kv=kv)
            req.metrics.arrival = arrival
            req.metrics.media_decode_s, req.metrics.preprocess_s = decode_s, preprocess_s
            requests.append(req)
        self.llm.run(requests)
        peak = self._peak_memory()
        results = []
        for req in requests:
            req.metrics.peak_memory_bytes = peak
            if kv is not None:
                kv.kept = req.kept_blocks
            results.append(GenerationResult(
                text=self.tokenizer.decode(req.output_ids),
                token_ids=req.output_ids,
                finish_reason=req.finish_reason,
                metrics=req.metrics.as_dict(),
                logits=req.logits,
            ))
        return results

    # ------------------------------------------------------------------ sessions
    def session(self, system: str | None = None, tenant: str | None = None, kv_budget_tokens: int | None = None) -> Session:
        """A new multi-turn session (see session.py); `tenant` keeps its cache apart."""
        sid = f"s-{uuid.uuid4().hex[:12]}"
        budget = kv_budget_tokens if kv_budget_tokens is not None else self.cfg.cache.session_kv_budget_tokens
        s = Session(self, sid, system, tenant, budget)
        self._sessions[sid] = s
        return s

    def live_session(self, system: str | None = None, tenant: str | None = None, *, memory=None,
                     min_pixels: int | None = None, max_pixels: int | None = None,
                     prefill_on_arrival: bool = True, kv_budget_tokens: int | None = None, policy: str = "exact"):
        """A session fed frame by frame (see live.py). Needs the encoder cache: one of
        LIVE_ENCODER_CACHE_BYTES is created if the engine has none."""
        from omnistream.sessions.live import LiveSession
        from omnistream.media.frame_memory import FrameMemoryConfig

        runner = self.llm.runner
        if runner.encoder_cache is None:
            log.warning("live session: no encoder cache configured, creating %d MiB", LIVE_ENCODER_CACHE_BYTES >> 20)
            runner.encoder_cache = EncoderCache(LIVE_ENCODER_CACHE_BYTES)
        sid = f"live-{uuid.uuid4().hex[:12]}"
        s = LiveSession(self, sid, system, tenant, kv_budget_tokens, memory or FrameMemoryConfig(),
                        min_pixels, max_pixels, prefill_on_arrival, policy)
        self._sessions[sid] = s
        return s

    def get_session(self, session_id: str) -> Session:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise UnknownSessionError(f"unknown session {session_id!r}") from None

    def stats(self) -> dict[str, Any]:
        runner = self.llm.runner
        enc = runner.encoder_cache
        return {
            "prefix_cache": self.llm.blocks.stats.as_dict(),
            "encoder_cache": dataclasses.asdict(enc.stats) if enc is not None else None,
            "vision_tokens_encoded": runner.vision_tokens_encoded,
            "kv_blocks_free": self.llm.blocks.num_free,
            "kv_blocks_total": self.llm.blocks.num_blocks,
            "sessions": len(self._sessions),
            "vision_offload": None if runner.vision_offload is None else {
                "loads": runner.vision_offload.loads, "load_s": runner.vision_offload.load_s,
                "bytes": runner.vision_offload.bytes},
        }

    def _peak_memory(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
