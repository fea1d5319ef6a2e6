"""The memory budget of a Qwen2.5-Omni thinker: its weights are counted with the audio tower (and
the vision tower's separate q / k / v), and the activation reserve covers an audio-encoder
forward."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

import torch

from omnistream.cache.budget import _size, activation_reserve_bytes, weight_bytes
from omnistream.config import EngineConfig
from omnistream.entrypoints.api import MAX_VISION_PATCHES, Engine
from omnistream.errors import BudgetError
from omnistream.models.demo import weight_specs
from omnistream.models.omni_demo import write_omni_model_dir
from omnistream.models.qwen2_5_omni import Qwen2_5OmniThinker
from omnistream.models.qwen2_5_omni_audio import audio_activation_bytes
from omnistream.models.qwen2_5_omni_config import omni_preset_config


def _meta(cfg) -> Qwen2_5OmniThinker:
    """The model's structure without its weights (an estimate needs only the config)."""
    with torch.device("meta"):
        return Qwen2_5OmniThinker(cfg)


@pytest.fixture(scope="module")
def omni_dir(tmp_path_factory):
    return write_omni_model_dir(tmp_path_factory.mktemp("omni-budget") / "m", omni_preset_config("omni-tiny"))


def test_weights_counted_with_the_audio_tower(omni_dir):
    cfg = omni_preset_config("omni-tiny")
    with Engine.from_pretrained(omni_dir, device="cpu", kv_cache_tokens=256) as eng:
        loaded = sum(p.numel() * p.element_size() for p in eng.model.parameters())
        audio = sum(p.numel() * p.element_size() for p in eng.model.audio_tower.parameters())
    assert weight_bytes(_meta(cfg), 4) == loaded
    assert audio > 0 and weight_bytes(_meta(cfg), 4) - 4 * sum(n for n in (_numel(s) for _, s, _ in weight_specs(cfg))) == audio


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def test_budget_too_small_for_the_weights_is_refused_with_their_size(omni_dir):
    figure = _size(weight_bytes(_meta(omni_preset_config("omni-tiny")), 4))
    with pytest.raises(BudgetError, match=rf"memory budget 1000 B is too small: it needs at least .*weights {re.escape(figure)}"):
        Engine.from_pretrained(omni_dir, device="cpu", memory_budget_bytes=1000)


def test_activation_reserve_covers_the_audio_encoder():
    cfg = omni_preset_config("omni-3b")
    engine_cfg = EngineConfig.from_kwargs("m")
    base = activation_reserve_bytes(_meta(cfg), engine_cfg, MAX_VISION_PATCHES, 2, graphs=False)
    wide = cfg.replace(audio=replace(cfg.audio, encoder_ffn_dim=16 * cfg.audio.encoder_ffn_dim))
    audio = audio_activation_bytes(wide.audio, MAX_VISION_PATCHES, 2)
    assert activation_reserve_bytes(_meta(wide), engine_cfg, MAX_VISION_PATCHES, 2, graphs=False) == int(1.25 * audio) > base
