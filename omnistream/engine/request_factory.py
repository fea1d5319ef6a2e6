"""Building requests where the engine is not: the front-end of an engine process.

`LLMEngine.make_request` is pure: it reads the model (positions, stop ids, context limit), the
pool's shape and the scheduler's admission check, and touches no engine state. A front-end
holds the same pieces without the GPU (the model on the `meta` device: its config and position
rules, no memory; a BlockManager and a Scheduler of the child's pool size, never allocated
from) and runs the very same method, so a request is built, checked (BudgetError,
UserInputError at submit) and named for the prefix cache in the caller's process exactly as an
in-thread engine builds it.
"""

from __future__ import annotations

import itertools
import uuid

from omnistream.cache.block_manager import BlockManager
from omnistream.config import EngineConfig
from omnistream.engine.llm_engine import LLMEngine
from omnistream.engine.scheduler import Scheduler
from omnistream.models.interface import MultimodalLM


class RequestFactory:
    """make_request() of an LLMEngine over `model` with a pool of `num_blocks` blocks, without
    the engine. Thread-safe as LLMEngine.make_request is (ids come from an itertools.count)."""

    def __init__(self, model: MultimodalLM, cfg: EngineConfig, num_blocks: int) -> None:
        # the attributes LLMEngine.make_request reads, set as LLMEngine.__init__ sets them
        self.cfg = cfg
        self.model = model
        self.stop_ids = set(model.stop_token_ids)
        self.max_context = model.max_context
        self.blocks = BlockManager(num_blocks, cfg.cache.block_size, cfg.cache.enable_prefix_caching)
        self.scheduler = Scheduler(cfg.scheduler, self.blocks)  # for check() only: nothing is added
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:6]

    # the engine's own method, not a copy: a request built here is the one the engine would build
    make_request = LLMEngine.make_request

    @property
    def kv_pool_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size
