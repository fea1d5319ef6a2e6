"""Benchmark models: the transformers baseline and our Engine holding the same weights.

A preset name ("3b", "7b", "demo", "tiny"; "omni-3b", "omni-7b", "omni-tiny" for the
Qwen2.5-Omni thinker) builds a random-weight model directly on the device (no checkpoint on disk,
no host copy): transformers initialises it (Qwen2_5_VLForConditionalGeneration, or
Qwen2_5OmniThinkerForConditionalGeneration for an Omni preset), our model copies its state dict.
A checkpoint directory loads both from that directory. The Engine needs a tokenizer: for a preset
it comes from a small random-weight directory of the same family written to a temporary folder
(only its tokenizer files are used: the Omni one names <|AUDIO|> and the other Omni tokens).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import torch

from omnistream.entrypoints.api import Engine, build_model
from omnistream.config import EngineConfig
from omnistream.engine.build import ModelRecipe
from omnistream.models.hf_config import QwenVLConfig
from omnistream.models.loader import load_state
from omnistream.models.qwen2_5_omni_config import OMNI_PRESETS, THINKER_MODEL_TYPE, OmniConfig, omni_preset_config
from omnistream.models.qwen2_5_vl import Qwen2_5_VLModel
from omnistream.models.qwen2_5_vl_presets import PRESETS, preset_config
from omnistream.models.tokenizer import Tokenizer

# every preset a benchmark's --model-config takes
ALL_PRESETS = (*PRESETS, *OMNI_PRESETS)


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
    return isinstance(model_config, str) and model_config in ALL_PRESETS


def is_omni_preset(model_config: str | Path) -> bool:
    return isinstance(model_config, str) and model_config in OMNI_PRESETS


def _preset(model_config: str) -> tuple[QwenVLConfig | OmniConfig, type]:
    """A preset's config and our model class."""
    if is_omni_preset(model_config):
        from omnistream.models.qwen2_5_omni import Qwen2_5OmniThinker

        # the thinker-only layout: transformers' thinker names its tensors without "thinker."
        return omni_preset_config(model_config, THINKER_MODEL_TYPE), Qwen2_5OmniThinker
    return preset_config(model_config), Qwen2_5_VLModel


def _hf_class(model_dir: Path):
    """transformers' class for a checkpoint directory (the Omni thinker for either Omni layout)."""
    from omnistream.models.registry import model_type_of

    if model_type_of(model_dir).startswith("qwen2_5_omni"):
        from transformers import Qwen2_5OmniThinkerForConditionalGeneration

        return Qwen2_5OmniThinkerForConditionalGeneration
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration


def make_pair(model_config: str | Path, device: str = "cuda", dtype: str | torch.dtype = "auto", seed: int = 0, **engine_options):
    """-> (transformers Qwen2_5_VLForConditionalGeneration, or the Omni thinker's
    Qwen2_5OmniThinkerForConditionalGeneration, and Engine) with identical weights.

    engine_options go to the EngineConfig (e.g. kv_cache_tokens=..., cuda_graphs=False)."""
    tdtype = resolve_dtype(dtype, device)
    if is_preset(model_config):
        cfg, model_class = _preset(model_config)
        hf = _random_hf_model(cfg, device, tdtype, seed)
        ours = build_model(model_class, cfg, torch.device(device), tdtype)
        load_state(ours, hf.state_dict().items())  # same device and dtype: one copy each
        return hf, _engine_for_preset(ours, device, tdtype, engine_options)
    model_dir = Path(model_config)
    hf = _hf_class(model_dir).from_pretrained(model_dir, dtype=tdtype, attn_implementation="sdpa")
    hf = hf.to(device).eval().requires_grad_(False)
    engine = Engine.from_pretrained(model_dir, device=device, dtype=_dtype_name(tdtype), **engine_options)
    return hf, engine


def make_engine(model_config: str | Path, device: str = "cuda", dtype: str | torch.dtype = "auto", seed: int = 0, **engine_options) -> Engine:
    """Our Engine alone (no transformers): random weights for a preset (same recipe as
    transformers' initialiser: N(0, std) matrices, zero biases, unit norms), else a checkpoint."""
    tdtype = resolve_dtype(dtype, device)
    if not is_preset(model_config):
        return Engine.from_pretrained(Path(model_config), device=device, dtype=_dtype_name(tdtype), **engine_options)
    if engine_options.get("engine_process"):  # the engine process makes the weights; here the shape only
        cfg, model_class = _preset(model_config)
        shape = build_model(model_class, cfg, torch.device("meta"), tdtype)
        return _engine_for_preset(shape, device, tdtype, engine_options, ModelRecipe(preset_model, (model_config, seed)))
    return _engine_for_preset(preset_model(model_config, seed, device=device, dtype=tdtype), device, tdtype, engine_options)


def preset_model(model_config: str, seed: int, engine_cfg: EngineConfig | None = None, *, device: str | None = None,
                 dtype: torch.dtype | None = None) -> Qwen2_5_VLModel:
    """A preset's model with random weights, built directly on the device (engine_cfg's, or
    `device` / `dtype`): the ModelRecipe an engine process runs for make_engine."""
    if engine_cfg is not None:
        device, dtype = engine_cfg.device, engine_cfg.torch_dtype
    cfg, model_class = _preset(model_config)
    ours = build_model(model_class, cfg, torch.device(device), dtype)
    _random_init(ours, cfg, seed)
    return ours


def _random_hf_model(cfg: QwenVLConfig | OmniConfig, device: str, dtype: torch.dtype, seed: int):
    if isinstance(cfg, OmniConfig):
        from transformers import Qwen2_5OmniThinkerConfig as Config, Qwen2_5OmniThinkerForConditionalGeneration as Model

        hc = Config(**cfg.thinker_dict())
        hc.audio_config.initializer_range = init_std(cfg.audio.d_model)
    else:
        from transformers import Qwen2_5_VLConfig as Config, Qwen2_5_VLForConditionalGeneration as Model

        hc = Config(**cfg.to_hf_dict())
    hc.text_config.initializer_range = init_std(cfg.text.hidden_size)
    hc.vision_config.initializer_range = init_std(cfg.vision.hidden_size)
    torch.manual_seed(seed)  # seeds the CUDA generators too: initialisation runs on the device
    with torch.device(device):
        hf = Model._from_config(hc, dtype=dtype, attn_implementation="sdpa")
    return hf.eval().requires_grad_(False)


def _tower_width(name: str, cfg: QwenVLConfig | OmniConfig) -> int:
    if name.startswith("visual."):
        return cfg.vision.hidden_size
    if name.startswith("audio_tower."):
        return cfg.audio.d_model
    return cfg.text.hidden_size


@torch.no_grad()
def _random_init(model: Qwen2_5_VLModel, cfg: QwenVLConfig | OmniConfig, seed: int) -> None:
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        std = init_std(_tower_width(name, cfg))
        # norm scales (RMSNorm, and the audio tower's LayerNorms: their biases are zeroed below)
        if p.ndim == 1 and name.endswith("weight") and any(k in name for k in ("norm", "ln_q", "ln_post")):
            p.fill_(1.0)
        elif p.ndim == 1:
            p.zero_()
        else:
            p.normal_(0.0, std)


def _engine_for_preset(model: Qwen2_5_VLModel, device: str, dtype: torch.dtype, options: dict,
                       recipe: ModelRecipe | None = None) -> Engine:
    """Wraps an in-memory model in an Engine; the tokenizer comes from a throwaway tiny
    checkpoint directory of the model's family (Engine.__init__ reads its random-weights
    marker, nothing else)."""
    tmp = Path(tempfile.mkdtemp(prefix="omnistream-bench-"))
    try:
        if isinstance(model.cfg, OmniConfig):
            from omnistream.models.omni_demo import write_omni_model_dir

            model_dir = write_omni_model_dir(tmp / "tokenizer", omni_preset_config("omni-tiny"), dtype="bfloat16")
        else:
            from omnistream.models.demo import write_model_dir

            model_dir = write_model_dir(tmp / "tokenizer", preset_config("tiny"), dtype="bfloat16", preset="tiny")
        cfg = EngineConfig.from_kwargs(str(model_dir), device=device, dtype=_dtype_name(dtype), **options)
        return Engine(cfg, model_dir, model, Tokenizer(model_dir), recipe)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
