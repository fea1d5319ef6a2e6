"""Checkpoint loading: untied embeddings with another vocab size (the 7B layout), sharded."""

from __future__ import annotations

import dataclasses

import pytest

from omnistream.entrypoints.api import Engine
from omnistream.engine.sampling import SamplingParams
from omnistream.errors import ConfigError
from omnistream.models.demo import write_model_dir
from omnistream.models.prompt import build_prompt
from tests.reference import assert_close_logits, reference_logits

transformers = pytest.importorskip("transformers")


def test_untied_other_vocab_matches_transformers(tmp_path, tiny_config):
    import torch

    cfg = tiny_config.replace(text=dataclasses.replace(tiny_config.text, tie_word_embeddings=False, vocab_size=152064))
    d = write_model_dir(tmp_path / "untied", cfg, seed=1, init_std=0.3, dtype="float32", shard_bytes=2 << 20)
    assert len(list(d.glob("*.safetensors"))) >= 3
    eng = Engine.from_pretrained(d, device="cpu", kv_cache_tokens=2048)
    assert eng.model.lm_head.weight.data_ptr() != eng.model.model.embed_tokens.weight.data_ptr()
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    conv = [{"role": "user", "content": "Count to five."}]
    [res] = eng.generate([conv], SamplingParams(max_new_tokens=5, ignore_eos=True), return_logits=True)
    prompt = build_prompt(eng.tokenizer, conv, [])
    assert_close_logits(res.logits, reference_logits(hf, prompt.token_ids, [], res.token_ids))


def test_missing_shard_is_a_clear_error(tmp_path, tiny_config):
    d = write_model_dir(tmp_path / "m", tiny_config, seed=0, dtype="float32")
    next(d.glob("model-00001-*.safetensors")).unlink()
    with pytest.raises(ConfigError, match="missing"):
        Engine.from_pretrained(d, device="cpu", kv_cache_tokens=1024)


def test_padded_vision_intermediate_is_exact(tiny_config):
    """An intermediate size that is not a multiple of 64 (the real 3420) is zero-padded inside
    our MLP for tensor-core shapes; the vision output must not change."""
    import torch

    from omnistream.models.loader import load_state
    from omnistream.models.qwen2_5_vl import Qwen2_5_VLModel

    cfg = tiny_config.replace(vision=dataclasses.replace(tiny_config.vision, intermediate_size=100))
    hf = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict())).float().eval()
    ours = Qwen2_5_VLModel(cfg).eval()
    load_state(ours, hf.state_dict().items())
    assert ours.visual.blocks[0].mlp.down_proj.weight.shape[1] == 128
    grids = [(2, 8, 12)]
    pixels = torch.randn(2 * 8 * 12, 1176)
    with torch.no_grad():
        ref = hf.model.visual(pixels, grid_thw=torch.tensor(grids)).pooler_output
        out = ours.encode_media(pixels, grids)
    assert ((ref - out).norm() / ref.norm()).item() < 1e-5
