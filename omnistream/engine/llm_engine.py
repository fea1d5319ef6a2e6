"""The engine loop: receive requests -> schedule a step -> run it -> process results.

Owns the scheduler, the block manager and the model runner; knows nothing about chat
templates or media files (see api.py).
"""

from __future__ import annotations

import itertools
import logging
import time

import torch

from omnistream.cache.block_manager import BlockManager
from omnistream.cache.prefix_hash import extend_hashes
from omnistream.config import EngineConfig
from omnistream.engine.model_runner import ModelRunner
from omnistream.engine.request import KVHandle, Request
from omnistream.engine.sampling import SamplingParams
from omnistream.engine.scheduler import Scheduler
from omnistream.media.item import MediaItem
from omnistream.models.qwen2_5_vl import Qwen2_5_VLModel

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, model: Qwen2_5_VLModel, cfg: EngineConfig, num_blocks: int, stop_ids: set[int]) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.stop_ids = stop_ids
        self.tokens_per_second = model.cfg.vision.tokens_per_second
        self.blocks = BlockManager(num_blocks, cfg.cache.block_size, cfg.cache.enable_prefix_caching)
        self.scheduler = Scheduler(cfg.scheduler, self.blocks)
        self.runner = ModelRunner(model, num_blocks, cfg.cache.block_size, self.device, cfg.torch_dtype)
        self._ids = itertools.count()

    def add_request(self, prompt_ids: list[int], media: list[tuple[int, MediaItem]], sampling: SamplingParams, request_id: str | None = None, cache_salt: str | None = None, known_hashes: list[bytes] | None = None, kv: KVHandle | None = None) -> Request:
        req = Request(request_id or f"req-{next(self._ids)}", prompt_ids, media, sampling, self.tokens_per_second, self.stop_ids, cache_salt, kv)
        if kv is not None:  # continues an owned KV sequence: no prefix-cache names
            self.scheduler.add(req)
            return req
        full = req.prompt_len // self.blocks.block_size
        req.block_hashes = list(known_hashes[:full]) if known_hashes else []  # a session's earlier turns
        # name the prompt's full blocks now, off the scheduling loop
        extend_hashes(req.block_hashes, req.token_ids, media, self.blocks.block_size, req.prompt_len // self.blocks.block_size, cache_salt)
        self.scheduler.add(req)
        return req

    def step(self) -> list[Request]:
        """One scheduling step; returns the requests that finished in it."""
        out = self.scheduler.schedule()
        if not out.chunks:
            if self.scheduler.has_work():
                raise RuntimeError("scheduler made no progress (KV pool too small for any waiting request)")
            return []
        t0 = time.perf_counter()
        results = self.runner.execute(out)
        now = self.runner._now()
        for c in out.chunks:
            req = c.request
            if c.start < req.prompt_len:  # vision encoding is reported on its own
                req.metrics.prefill_s += now - t0 - self.runner.last_vision_s
            req.num_computed_tokens += c.num_tokens
            self.blocks.register_computed(req)
        finished = []
        for c, token in results:
            req = c.request
            if req.metrics.first_token_at is None:
                req.metrics.first_token_at = now
            req.append_token(token)
            if req.finished:
                req.metrics.finished_at = now
                req.mm_embeds = [None] * len(req.media)
                self.scheduler.finish(req)
                finished.append(req)
        return finished

    def run(self, requests: list[Request]) -> None:
        """Steps until every given request has finished."""
        pending = {r.request_id for r in requests}
        while pending:
            for req in self.step():
                pending.discard(req.request_id)
