"""Model registry: a checkpoint's `model_type` -> its config reader and model class.

    spec = resolve(model_dir)          # ModelEntry for the checkpoint
    cfg = spec.read_config(model_dir)
    model = spec.model_class(cfg)      # implements models/interface.MultimodalLM
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omnistream.errors import ConfigError


@dataclass(frozen=True)
class ModelEntry:
    model_type: str
    read_config: Callable[[Path], object]
    model_class: type


_REGISTRY: dict[str, Callable[[], ModelEntry]] = {}


def register(model_type: str, entry: Callable[[], ModelEntry]) -> None:
    """entry is called on first use (model modules import torch and the layers)."""
    _REGISTRY[model_type] = entry


def _qwen2_5_vl() -> ModelEntry:
    from omnistream.models.hf_config import QwenVLConfig
    from omnistream.models.qwen2_5_vl import Qwen2_5_VLModel

    return ModelEntry("qwen2_5_vl", QwenVLConfig.from_dir, Qwen2_5_VLModel)


register("qwen2_5_vl", _qwen2_5_vl)


def _qwen2_5_omni() -> ModelEntry:
    from omnistream.models.qwen2_5_omni import Qwen2_5OmniThinker
    from omnistream.models.qwen2_5_omni_config import OmniConfig

    return ModelEntry("qwen2_5_omni", OmniConfig.from_dir, Qwen2_5OmniThinker)


register("qwen2_5_omni", _qwen2_5_omni)  # the full checkpoint: its thinker is loaded
register("qwen2_5_omni_thinker", _qwen2_5_omni)  # the thinker saved alone


def model_type_of(model_dir: Path) -> str:
    try:
        raw = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{model_dir}: unreadable config.json ({e})") from None
    return raw.get("model_type", "qwen2_5_vl")


def resolve(model_dir: Path) -> ModelEntry:
    kind = model_type_of(model_dir)
    if kind not in _REGISTRY:
        raise ConfigError(f"model_type {kind!r} is not supported; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[kind]()
