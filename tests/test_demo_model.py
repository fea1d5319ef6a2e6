"""Config parsing/presets and random-weight checkpoints, checked against transformers."""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import pytest
import torch
from safetensors import safe_open

from omnistream.errors import ConfigError
from omnistream.models.demo import (
    RANDOM_WEIGHTS_MARKER,
    _generate,
    ensure_demo_model,
    is_random_weights,
    weight_specs,
    write_model_dir,
)
from omnistream.models.hf_config import QwenVLConfig, TextConfig
from omnistream.models.qwen2_5_vl_presets import preset_config

transformers = pytest.importorskip("transformers")


# ---------------------------------------------------------------------------------------------
# configs


def test_real_presets_match_reference():
    c3, c7 = preset_config("3b"), preset_config("7b")
    for c, hidden, inter, layers, heads, kv, vocab, tie in [
        (c3, 2048, 11008, 36, 16, 2, 151936, True),
        (c7, 3584, 18944, 28, 28, 4, 152064, False),
    ]:
        t, v = c.text, c.vision
        assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers) == (hidden, inter, layers)
        assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (heads, kv, 128)
        assert (t.vocab_size, t.tie_word_embeddings) == (vocab, tie)
        assert t.mrope_section == (16, 24, 24) and t.rope_theta == 1e6 and t.rms_norm_eps == 1e-6
        assert t.max_position_embeddings == 128000
        assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads) == (32, 1280, 3420, 16)
        assert (v.patch_size, v.spatial_merge_size, v.temporal_patch_size) == (14, 2, 2)
        assert (v.window_size, v.tokens_per_second) == (112, 2)
        assert v.fullatt_block_indexes == (7, 15, 23, 31)
        assert v.out_hidden_size == hidden and v.patch_dim == 1176
        assert (c.bos_token_id, c.eos_token_id, c.im_start_token_id) == (151643, 151645, 151644)
        assert (c.vision_start_token_id, c.vision_end_token_id) == (151652, 151653)
        assert (c.vision_pad_token_id, c.image_token_id, c.video_token_id) == (
            151654,
            151655,
            151656,
        )


def test_small_presets():
    demo, tiny = preset_config("demo"), preset_config("tiny")
    assert demo.text.head_dim == 64 and demo.text.mrope_section == (8, 12, 12)
    assert demo.vision.out_hidden_size == demo.text.hidden_size == 256
    assert demo.vision.fullatt_block_indexes == (1, 3) and demo.text.vocab_size == 151936
    assert tiny.text.head_dim == 16 and tiny.text.mrope_section == (2, 3, 3)
    assert tiny.vision.head_dim == 16 and tiny.vision.fullatt_block_indexes == (1, 3)
    assert tiny.text.tie_word_embeddings and demo.text.tie_word_embeddings
    with pytest.raises(ConfigError, match="unknown preset"):
        preset_config("13b")


@pytest.mark.parametrize("name", ["3b", "7b", "demo", "tiny"])
def test_hub_dict_roundtrip(name):
    c = preset_config(name)
    d = c.to_hf_dict()
    assert d["rope_scaling"] == {"type": "mrope", "mrope_section": list(c.text.mrope_section)}
    assert d["vision_config"]["hidden_size"] == c.vision.hidden_size
    assert d["vision_config"]["tokens_per_second"] == c.vision.tokens_per_second
    assert "text_config" not in d
    assert QwenVLConfig.from_dict(json.loads(json.dumps(d))) == c


@pytest.mark.parametrize("name", ["7b", "tiny"])
def test_transformers_reads_our_config_and_v5_layout_parses(tmp_path, name):
    c = preset_config(name)
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "config.json").write_text(json.dumps(c.to_hf_dict()))
    hf = transformers.AutoConfig.from_pretrained(tmp_path / "hub")
    t, v = hf.text_config, hf.vision_config
    assert t.hidden_size == c.text.hidden_size and t.num_key_value_heads == c.text.num_key_value_heads
    assert t.rope_parameters["mrope_section"] == list(c.text.mrope_section)
    assert t.rope_parameters["rope_theta"] == c.text.rope_theta
    assert t.rms_norm_eps == c.text.rms_norm_eps
    assert hf.tie_word_embeddings == c.text.tie_word_embeddings
    assert v.hidden_size == c.vision.hidden_size and v.tokens_per_second == 2
    assert list(v.fullatt_block_indexes) == list(c.vision.fullatt_block_indexes)
    assert v.out_hidden_size == c.vision.out_hidden_size and v.window_size == 112
    assert (hf.image_token_id, hf.video_token_id) == (c.image_token_id, c.video_token_id)
    assert hf.vision_start_token_id == c.vision_start_token_id

    # transformers-5 layout (text_config + rope_parameters) parses back to the same config
    hf.save_pretrained(tmp_path / "v5")
    saved = json.loads((tmp_path / "v5" / "config.json").read_text())
    assert "text_config" in saved and "rope_parameters" in saved["text_config"]
    assert QwenVLConfig.from_dir(tmp_path / "v5") == c


def _bad(mutate):
    d = preset_config("tiny").to_hf_dict()
    mutate(d)
    return d


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d["rope_scaling"].update(mrope_section=[2, 3, 4]), "sums to 9.*head_dim / 2 = 8"),
        (lambda d: d.update(num_attention_heads=5), "not divisible by num_attention_heads"),
        (lambda d: d.update(num_key_value_heads=3), "not divisible by num_key_value_heads"),
        (lambda d: d["vision_config"].update(out_hidden_size=32), "out_hidden_size 32 must equal"),
        (lambda d: d["vision_config"].update(fullatt_block_indexes=[1, 4]), "outside \\[0, depth=4\\)"),
        (lambda d: d["vision_config"].update(num_heads=3), "not divisible by num_heads"),
        (lambda d: d["vision_config"].update(window_size=100), "multiple of"),
        (lambda d: d.pop("vision_config"), "no 'vision_config'"),
        (lambda d: d.pop("rope_scaling"), "no M-RoPE settings"),
        (lambda d: d["rope_scaling"].update(type="yarn"), "not supported"),
        (lambda d: d.update(model_type="qwen2_vl"), "model_type 'qwen2_vl'"),
        (lambda d: d.pop("hidden_size"), "missing the text field 'hidden_size'"),
        (lambda d: d.update(hidden_size="64"), "hidden_size must be an integer"),
        (lambda d: d.update(vocab_size=1000), "outside the vocabulary"),
        (lambda d: d.update(hidden_act="gelu"), "hidden_act 'gelu'"),
    ],
)
def test_config_validation_errors(mutate, match):
    with pytest.raises(ConfigError, match=match):
        QwenVLConfig.from_dict(_bad(mutate))


def test_from_dir_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        QwenVLConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        QwenVLConfig.from_dir(tmp_path)


def test_missing_vision_fields_default_to_real_checkpoint_values():
    d = preset_config("7b").to_hf_dict()
    d["vision_config"] = {"out_hidden_size": 3584}
    c = QwenVLConfig.from_dict(d)
    assert c.vision == preset_config("7b").vision  # not transformers' 3584 / tokens_per_second 4


def test_frozen_and_head_dim():
    t = preset_config("tiny").text
    assert isinstance(t, TextConfig) and t.head_dim == 16 and t.num_key_value_groups == 2
    with pytest.raises(Exception):
        t.hidden_size = 1  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# checkpoint directory


def test_model_dir_layout(tiny_model_dir, tiny_config):
    files = set(os.listdir(tiny_model_dir))
    for name in [
        "config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "chat_template.json",
        "preprocessor_config.json",
        "generation_config.json",
        RANDOM_WEIGHTS_MARKER,
    ]:
        assert name in files, name
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert len(shards) >= 2
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"

    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert cfg["torch_dtype"] == "float32" and "vision_config" in cfg and "rope_scaling" in cfg
    assert QwenVLConfig.from_dir(tiny_model_dir) == tiny_config.replace(torch_dtype="float32")

    index = json.loads((tiny_model_dir / "model.safetensors.index.json").read_text())
    specs = {name: shape for name, shape, _ in weight_specs(tiny_config)}
    assert set(index["weight_map"]) == set(specs)
    assert "lm_head.weight" not in specs  # tied
    total = 0
    seen = set()
    for shard in shards:
        with safe_open(str(tiny_model_dir / shard), framework="pt") as f:
            for key in f.keys():
                assert index["weight_map"][key] == shard
                t = f.get_tensor(key)
                assert tuple(t.shape) == specs[key] and t.dtype == torch.float32
                total += t.numel() * t.element_size()
                seen.add(key)
    assert seen == set(specs) and index["metadata"]["total_size"] == total
    with safe_open(str(tiny_model_dir / shards[-1]), framework="pt") as f:
        assert tuple(f.get_tensor("visual.patch_embed.proj.weight").shape) == (32, 3, 2, 14, 14)

    pre = json.loads((tiny_model_dir / "preprocessor_config.json").read_text())
    assert (pre["min_pixels"], pre["max_pixels"], pre["patch_size"]) == (3136, 12845056, 14)
    assert (pre["temporal_patch_size"], pre["merge_size"]) == (2, 2)
    assert pre["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
    assert pre["image_std"] == [0.26862954, 0.26130258, 0.27577711]
    tc = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert "<|video_pad|>" in tc["chat_template"] and "Picture" in tc["chat_template"]
    assert json.loads((tiny_model_dir / "chat_template.json").read_text()) == {
        "chat_template": tc["chat_template"]
    }

    assert is_random_weights(tiny_model_dir)
    marker = json.loads((tiny_model_dir / RANDOM_WEIGHTS_MARKER).read_text())
    assert marker["preset"] == "tiny" and marker["init_std"] == 0.3


def test_weights_are_deterministic_and_scaled(tiny_model_dir, tiny_config):
    index = json.loads((tiny_model_dir / "model.safetensors.index.json").read_text())
    regenerated = dict(_generate(weight_specs(tiny_config), 0, 0.3, torch.float32))
    for key in ["model.layers.1.self_attn.q_proj.weight", "visual.merger.mlp.2.bias",
                "model.norm.weight"]:
        with safe_open(str(tiny_model_dir / index["weight_map"][key]), framework="pt") as f:
            assert torch.equal(f.get_tensor(key), regenerated[key])
    q = regenerated["model.layers.0.self_attn.q_proj.weight"]
    assert 0.27 < q.std().item() < 0.33
    n = regenerated["model.layers.0.input_layernorm.weight"]
    assert 0.9 < n.mean().item() < 1.1 and n.std().item() > 0.05  # norms ~1, but not exactly
    other = dict(_generate(weight_specs(tiny_config), 1, 0.3, torch.float32))
    assert not torch.equal(other["model.norm.weight"], regenerated["model.norm.weight"])


def test_write_refuses_non_empty_dir(tmp_path, tiny_config):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        write_model_dir(tmp_path / "x", tiny_config)
    with pytest.raises(ConfigError, match="init_std"):
        write_model_dir(tmp_path / "y", tiny_config, init_std=float("nan"))
    assert not is_random_weights(tmp_path / "x")


# ---------------------------------------------------------------------------------------------
# transformers loads it and the weights matter


def test_transformers_loads_every_weight_tied(tiny_model_dir):
    model, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tiny_model_dir, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info["error_msgs"]
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    # a loaded weight equals the file (no silent re-init)
    index = json.loads((tiny_model_dir / "model.safetensors.index.json").read_text())
    key = "model.layers.0.self_attn.k_proj.bias"
    with safe_open(str(tiny_model_dir / index["weight_map"][key]), framework="pt") as f:
        want = f.get_tensor(key)
    assert torch.equal(model.model.language_model.layers[0].self_attn.k_proj.bias, want)
    with safe_open(str(tiny_model_dir / index["weight_map"]["visual.merger.mlp.0.weight"]),
                   framework="pt") as f:
        assert torch.equal(model.model.visual.merger.mlp[0].weight,
                           f.get_tensor("visual.merger.mlp.0.weight"))


def test_transformers_loads_untied_many_shards(tmp_path, tiny_config):
    cfg = tiny_config.replace(text=dataclasses.replace(tiny_config.text, tie_word_embeddings=False))
    d = write_model_dir(tmp_path / "untied", cfg, init_std=0.3, dtype="bfloat16",
                        shard_bytes=8 * 2**20)
    shards = [f for f in os.listdir(d) if f.endswith(".safetensors")]
    assert len(shards) >= 4
    model, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        d, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, model.model.language_model.embed_tokens.weight)


def _video_inputs(cfg, grid=(2, 4, 8), text_before=10, text_after=10):
    n = grid[0] * grid[1] * grid[2]
    ids = (
        [cfg.im_start_token_id]
        + list(range(100, 100 + text_before))
        + [cfg.vision_start_token_id]
        + [cfg.video_token_id] * (n // 4)
        + [cfg.vision_end_token_id]
        + list(range(200, 200 + text_after))
    )
    pv = torch.randn(n, 1176, generator=torch.Generator().manual_seed(0))
    return dict(
        input_ids=torch.tensor([ids]),
        pixel_values_videos=pv,
        video_grid_thw=torch.tensor([grid]),
        second_per_grid_ts=torch.tensor([1.0]),
    )


def _pos(length):
    return torch.arange(length).view(1, 1, length).expand(3, 1, length).clone()


@torch.no_grad()
def test_forward_finite_and_position_sensitive(hf_tiny_model, tiny_config):
    model = hf_tiny_model
    inputs = _video_inputs(tiny_config)
    length = inputs["input_ids"].shape[1]
    logits = model(**inputs).logits
    assert torch.isfinite(logits).all()
    assert logits.abs().max() > 1.0  # weights large enough to matter

    base = model(**inputs, position_ids=_pos(length)).logits
    moved = _pos(length)
    moved[1] += torch.arange(length) % 3  # perturb only the h row
    other = model(**inputs, position_ids=moved).logits
    assert (base - other).abs().max() > 0.1

    ids = torch.tensor([list(range(1000, 1040))])
    a = model(input_ids=ids, position_ids=_pos(40)).logits
    b = model(input_ids=ids, position_ids=_pos(40) * 2).logits
    c = model(input_ids=ids, position_ids=_pos(40) + 7).logits  # RoPE is relative
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert (a - b).abs().max() > 0.5
    assert (a - c).abs().max() < 1e-3


@torch.no_grad()
def test_large_init_stays_finite(tmp_path, tiny_config):
    d = write_model_dir(tmp_path / "big", tiny_config, init_std=1.0, dtype="float32")
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(d, dtype=torch.float32)
    logits = model.eval()(**_video_inputs(tiny_config)).logits
    assert torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------
# demo model cache


def test_ensure_demo_model(tmp_path, monkeypatch):
    monkeypatch.setenv("OMNISTREAM_CACHE", str(tmp_path / "envcache"))
    d = ensure_demo_model()
    assert d == tmp_path / "envcache" / "demo-model" and is_random_weights(d)
    cfg = QwenVLConfig.from_dir(d)
    assert cfg.replace(torch_dtype="bfloat16") == preset_config("demo")
    stamp = (d / "config.json").stat().st_mtime_ns
    assert ensure_demo_model() == d and (d / "config.json").stat().st_mtime_ns == stamp
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".demo-model")]

    model, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        d, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        logits = model.eval()(**_video_inputs(cfg)).logits
    assert torch.isfinite(logits).all()

    # a stale cached model (other recipe) is replaced
    marker = json.loads((d / RANDOM_WEIGHTS_MARKER).read_text())
    marker["fingerprint"] = "stale"
    (d / RANDOM_WEIGHTS_MARKER).write_text(json.dumps(marker))
    assert ensure_demo_model(tmp_path / "envcache") == d
    assert json.loads((d / RANDOM_WEIGHTS_MARKER).read_text())["fingerprint"] != "stale"
    assert sorted(p.name for p in d.parent.iterdir()) == ["demo-model"]


def test_config_copy_is_independent():
    d = preset_config("tiny").to_hf_dict()
    d2 = copy.deepcopy(d)
    QwenVLConfig.from_dict(d)
    assert d == d2  # parsing does not mutate its input
