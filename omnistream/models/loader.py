"""Load Hugging Face safetensors checkpoints into our modules by name.

Accepts the hub layout (`model.layers.*`, `visual.*`, `lm_head.*`) and the transformers-5
layout (`model.language_model.*`, `model.visual.*`). Packed parameters (qkv, gate_up) get their
slices through the parameter's `weight_loader`. Every parameter must be loaded exactly once.
A model with another layout names its tensors itself (`model.checkpoint_name(raw) -> name, or
None for a tensor it does not load`, e.g. Qwen2.5-Omni's `thinker.` prefix and talker).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from omnistream.errors import ConfigError
from omnistream.layers.linear import default_weight_loader

log = logging.getLogger(__name__)

_PREFIX_MAP = (("model.language_model.", "model."), ("model.visual.", "visual."))


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / n for n in names]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    missing = [f for f in files if not f.exists()]
    if not files or missing:
        raise ConfigError(f"{model_dir}: no safetensors weights found" + (f" (missing {missing[0].name})" if missing else ""))
    return files


def _canonical(name: str | None) -> str | None:
    if name is None:
        return None
    for old, new in _PREFIX_MAP:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _target(name: str, packed: dict[str, tuple[str, int]]) -> tuple[str, int | None]:
    for src, (dst, shard) in packed.items():
        if f".{src}." in name:
            return name.replace(f".{src}.", f".{dst}."), shard
    return name, None


def iter_checkpoint(model_dir: Path):
    """Yields (name, tensor) over every shard of a checkpoint directory."""
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for raw in f.keys():
                yield raw, f.get_tensor(raw)


def load_weights(model: nn.Module, model_dir: Path) -> None:
    load_state(model, iter_checkpoint(model_dir))


def load_state(model: nn.Module, items) -> None:
    """Copy (name, tensor) pairs (checkpoint or transformers naming) into `model`."""
    params = dict(model.named_parameters())
    packed = getattr(model, "packed_modules_mapping", {})
    loaded: set[str] = set()
    tied = getattr(getattr(model, "cfg", None), "text", None)
    tied = bool(tied and tied.tie_word_embeddings)
    rename = getattr(model, "checkpoint_name", None)  # a model's own layout (e.g. a prefix)
    for raw, tensor in items:
        name = _canonical(raw if rename is None else rename(raw))
        if name is None:
            continue  # a part of the checkpoint this model does not load
        if tied and name == "lm_head.weight":
            continue  # tied checkpoints may still carry a copy
        target, shard = _target(name, packed)
        if target not in params and name in params:  # packing applies where the model packs
            target, shard = name, None
        param = params.get(target)
        if param is None:
            raise ConfigError(f"unexpected weight {raw!r} in checkpoint")
        loader = getattr(param, "weight_loader", default_weight_loader)
        with torch.no_grad():
            loader(param, tensor.to(param.device, param.dtype), shard)
        loaded.add(target if shard is None else f"{target}#{shard}")
    _check_complete(model, params, loaded, packed, tied)


def _check_complete(model, params, loaded, packed, tied) -> None:
    shards: dict[str, int] = {}
    for dst, shard in packed.values():
        shards[dst] = max(shards.get(dst, 0), shard + 1)
    missing = []
    for name in params:
        if tied and name == "lm_head.weight":
            continue
        kind = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
        n = shards.get(kind)
        if n is None:
            if name not in loaded:
                missing.append(name)
        else:
            missing += [f"{name}#{i}" for i in range(n) if f"{name}#{i}" not in loaded]
    if missing:
        raise ConfigError(f"checkpoint is missing {len(missing)} weights, e.g. {missing[:3]}")
