"""Benchmark models: the transformers baseline and our Engine holding the same weights.

A preset name ("3b", "7b", "demo", "tiny") builds a random-weight model directly on the device
(no checkpoint on disk, no host copy): transformers initialises it, our model copies its state
dict. A checkpoint directory loads both from that directory. The Engine needs a tokenizer: for a
preset it comes from a small random-weight directory written to a temporary folder (only its
tokenizer files are used).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import torch

from omnistream.entrypoints.api import Engine, build_model
from omnistream.config import EngineConfig
from omnistream.models.hf_config import PRESETS, QwenVLConfig, preset_config
from omnistream.models.loader import load_state
from omnistream.models.qwen2_5_vl import Qwen2_5_VLModel
from omnistream.models.tokenizer import Tokenizer


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """"auto" -> bfloat16 on CUDA, float32 on CPU (the Engine's rule)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    return EngineConfig(model="-", device=device, dtype=dtype).torch_dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def init_std(hidden_size: int) -> float:
    """Weight std for random models: 0.02 (the checkpoints' initializer_range) for real sizes,
    larger for small hidden sizes so that logits keep a spread of ~1.2 (std * sqrt(hidden)) and
    greedy decoding is not decided by rounding noise."""
    return max(0.02, 1.2 / math.sqrt(hidden_size))


def is_preset(model_config: str | Path) -> bool:
    return isinstance(model_config, str) and model_config in PRESETS


def make_pair(model_config: str | Path, device: str = "cuda", dtype: str | torch.dtype = "auto", seed: int = 0, **engine_options):
    """-> (transformers Qwen2_5_VLForConditionalGeneration, Engine) with identical weights.

    engine_options go to the EngineConfig (e.g. kv_cache_tokens=..., cuda_graphs=False)."""
    tdtype = resolve_dtype(dtype, device)
    if is_preset(model_config):
        cfg = preset_config(model_config)
        hf = _random_hf_model(cfg, device, tdtype, seed)
        ours = build_model(Qwen2_5_VLModel, cfg, torch.device(device), tdtype)
        load_state(ours, hf.state_dict().items())  # same device and dtype: one copy each
        return hf, _engine_for_preset(ours, device, tdtype, engine_options)
    model_dir = Path(model_config)
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=tdtype, attn_implementation="sdpa")
    hf = hf.to(device).eval().requires_grad_(False)
    engine = Engine.from_pretrained(model_dir, device=device, dtype=_dtype_name(tdtype), **engine_options)
    return hf, engine


def make_engine(model_config: str | Path, device: str = "cuda", dtype: str | torch.dtype = "auto", seed: int = 0, **engine_options) -> Engine:
    """Our Engine alone (no transformers): random weights for a preset (same recipe as
    transformers' initialiser: N(0, std) matrices, zero biases, unit norms), else a checkpoint."""
    tdtype = resolve_dtype(dtype, device)
    if not is_preset(model_config):
        return Engine.from_pretrained(Path(model_config), device=device, dtype=_dtype_name(tdtype), **engine_options)
    cfg = preset_config(model_config)
    ours = build_model(Qwen2_5_VLModel, cfg, torch.device(device), tdtype)
    _random_init(ours, cfg, seed)
    return _engine_for_preset(ours, device, tdtype, engine_options)


def _random_hf_model(cfg: QwenVLConfig, device: str, dtype: torch.dtype, seed: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    hc = Qwen2_5_VLConfig(**cfg.to_hf_dict())
    hc.text_config.initializer_range = init_std(cfg.text.hidden_size)
    hc.vision_config.initializer_range = init_std(cfg.vision.hidden_size)
    torch.manual_seed(seed)  # seeds the CUDA generators too: initialisation runs on the device
    with torch.device(device):
        hf = Qwen2_5_VLForConditionalGeneration._from_config(hc, dtype=dtype, attn_implementation="sdpa")
    return hf.eval().requires_grad_(False)


@torch.no_grad()
def _random_init(model: Qwen2_5_VLModel, cfg: QwenVLConfig, seed: int) -> None:
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        std = init_std(cfg.vision.hidden_size if name.startswith("visual.") else cfg.text.hidden_size)
        if p.ndim == 1 and ("norm" in name or "ln_q" in name):
            p.fill_(1.0)
        elif p.ndim == 1:
            p.zero_()
        else:
            p.normal_(0.0, std)


def _engine_for_preset(model: Qwen2_5_VLModel, device: str, dtype: torch.dtype, options: dict) -> Engine:
    """Wraps an in-memory model in an Engine; the tokenizer comes from a throwaway tiny
    checkpoint directory (Engine.__init__ reads its random-weights marker, nothing else)."""
    from omnistream.models.demo import write_model_dir

    tmp = Path(tempfile.mkdtemp(prefix="omnistream-bench-"))
    try:
        model_dir = write_model_dir(tmp / "tokenizer", preset_config("tiny"), dtype="bfloat16", preset="tiny")
        cfg = EngineConfig.from_kwargs(str(model_dir), device=device, dtype=_dtype_name(dtype), **options)
        return Engine(cfg, model_dir, model, Tokenizer(model_dir))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
