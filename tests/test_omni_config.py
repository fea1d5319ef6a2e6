"""Qwen2.5-Omni checkpoints: both config layouts parse (through the registry, from config.json
alone), the full layout loads only the thinker (talker and token2wav skipped), bad configs get a
clear ConfigError; TMRoPE's interleaving rule on hand-computed cases; the audio encoder equals
transformers' chunk by chunk."""

from __future__ import annotations

import json

import pytest
import torch

from omnistream.entrypoints.api import build_model
from omnistream.errors import ConfigError, UserInputError
from omnistream.media.item import MediaItem
from omnistream.models.loader import load_weights
from omnistream.models.omni_demo import write_omni_model_dir
from omnistream.models.qwen2_5_omni import Qwen2_5OmniThinker
from omnistream.models.qwen2_5_omni_config import FULL_MODEL_TYPE, THINKER_MODEL_TYPE, OmniConfig, omni_preset_config
from omnistream.models.registry import resolve
from omnistream.models.tmrope import chunk_bounds, interleave_audio_in_video, tmrope_positions


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory):
    return write_omni_model_dir(tmp_path_factory.mktemp("omni") / "full", omni_preset_config("omni-tiny"), init_std=0.3)


def test_presets_parse_back():
    for name in ("omni-3b", "omni-7b", "omni-tiny"):
        for layout in (FULL_MODEL_TYPE, THINKER_MODEL_TYPE):
            cfg = omni_preset_config(name, layout)
            assert OmniConfig.from_dict(cfg.to_hf_dict()) == cfg
    cfg = omni_preset_config("omni-7b")
    assert (cfg.audio.d_model, cfg.audio.encoder_layers, cfg.audio.output_dim, cfg.text.hidden_size) == (1280, 32, 3584, 3584)
    assert cfg.weight_prefix == "thinker." and omni_preset_config("omni-7b", THINKER_MODEL_TYPE).weight_prefix == ""


def test_full_layout_loads_the_thinker_only(full_dir):
    entry = resolve(full_dir)  # from config.json's model_type, no name matching
    assert entry.model_class is Qwen2_5OmniThinker
    cfg = entry.read_config(full_dir)
    model = build_model(entry.model_class, cfg, torch.device("cpu"), torch.float32)
    load_weights(model, full_dir)  # every parameter loaded once; talker./token2wav. tensors skipped
    index = json.loads((full_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(k.startswith("talker.") for k in index) and all(k.startswith(("thinker.", "talker.", "token2wav.")) for k in index)
    from safetensors import safe_open

    shard = full_dir / index["thinker.visual.blocks.0.attn.k.weight"]
    with safe_open(str(shard), framework="pt") as f:
        k = f.get_tensor("thinker.visual.blocks.0.attn.k.weight")
    vh = cfg.vision.hidden_size
    assert torch.equal(model.visual.blocks[0].attn.qkv.weight[vh : 2 * vh], k)  # separate q/k/v packed in order


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.pop("thinker_config"), "thinker_config"),
    (lambda d: d["thinker_config"].pop("audio_config"), "audio_config"),
    (lambda d: d["thinker_config"]["audio_config"].update(output_dim=32), "output_dim"),
    (lambda d: d["thinker_config"]["audio_config"].update(d_model=33), "divisible"),
    (lambda d: d["thinker_config"].update(audio_token_index=151655), "both"),
    (lambda d: d["thinker_config"]["text_config"].pop("rope_scaling"), "M-RoPE"),
    (lambda d: d.update(model_type="qwen2_5_omni_talker"), "not a Qwen2.5-Omni"),
])
def test_bad_configs(mutate, match):
    d = omni_preset_config("omni-tiny").to_hf_dict()
    mutate(d)
    with pytest.raises(ConfigError, match=match):
        OmniConfig.from_dict(d)


def _video(t: int, spg: float = 1.0) -> MediaItem:
    return MediaItem(kind="video", pixel_values=torch.zeros(t * 4, 1176), grid_thw=(t, 2, 2), second_per_grid_t=spg)


def _audio(chunks: int, rest: int = 0) -> list[MediaItem]:
    items = [MediaItem(kind="audio", pixel_values=torch.zeros(chunks * 200, 128), grid_thw=(chunks, 200, 1))]
    if rest:
        items.append(MediaItem(kind="audio", pixel_values=torch.zeros(rest, 128), grid_thw=(1, rest, 1)))
    return items


def test_chunk_bounds_is_the_reference_rule():
    assert chunk_bounds([0, 25, 50, 75, 100], 50) == [(0, 2), (2, 4), (4, 5)]
    assert chunk_bounds(list(range(120)), 50) == [(0, 50), (50, 100), (100, 120)]
    # a jump over two chunks advances the count by one only (the original code's behaviour)
    assert chunk_bounds([0, 0, 100, 100], 50) == [(0, 2), (2, 3), (3, 4)]


def test_audio_in_video_positions_by_hand():
    # 3 temporal patches at 2 fps (t = 0, 25, 50), 1 merged token each; audio of 70 tokens
    # (a 2 s chunk + 20 tokens): pieces V[0,25] A[0..49] V[50] A[50..69]
    pieces = interleave_audio_in_video(_video(3), _audio(1, 81), 25, 2, "b")
    assert [(m.kind, m.num_tokens, m.source_start) for m in pieces] == [("video", 2, 0), ("audio", 50, 0), ("video", 1, 2), ("audio", 20, 50)]
    text_before = 3  # ... <|vision_bos|><|audio_bos|> at offsets 3, 4
    n = text_before + 2 + 73 + 2 + 1
    media, off = [], text_before + 2
    for m in pieces:
        media.append((off, m))
        off += m.num_tokens
    pos, nxt = tmrope_positions(n, media, 25)
    t = pos[0].tolist()
    assert t[:5] == [0, 1, 2, 3, 3]  # the two bos tokens share 3
    s = 4
    assert t[5:7] == [s, s + 25] and t[7:57] == list(range(s, s + 50)) and t[57] == s + 50 and t[58:78] == list(range(s + 50, s + 70))
    assert t[78:80] == [s + 70, s + 70] and t[80] == s + 71 and nxt == s + 72  # eos pair = last piece's max + 1


def test_audio_in_video_needs_a_frame_pair_per_chunk():
    with pytest.raises(UserInputError, match="fps"):
        interleave_audio_in_video(_video(3, spg=4.0), _audio(2), 25, 2, "b")  # 0.5 fps: t = 0, 100, 200


def test_audio_encoder_equals_transformers_chunk_by_chunk():
    transformers = pytest.importorskip("transformers")
    from omnistream.models.qwen2_5_omni_audio import AudioEncoder

    cfg = omni_preset_config("omni-tiny").audio
    hf_cfg = transformers.Qwen2_5OmniAudioEncoderConfig(**{k: v for k, v in omni_preset_config("omni-tiny").thinker_dict()["audio_config"].items() if k != "model_type"})
    torch.manual_seed(0)
    hf = transformers.models.qwen2_5_omni.modeling_qwen2_5_omni.Qwen2_5OmniAudioEncoder(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    ours = AudioEncoder(cfg)
    ours.load_state_dict(hf.state_dict(), strict=False)
    assert set(hf.state_dict()) - {"positional_embedding.positional_embedding"} <= set(ours.state_dict())
    feats = torch.randn(128, 537)  # 2 chunks of 200 + 137
    with torch.no_grad():
        ref = hf(feats, feature_lens=torch.tensor([537])).last_hidden_state
        whole = ours(feats.T.contiguous(), [(2, 200, 1), (1, 137, 1)])
        pieces = [ours(feats.T[a:b].contiguous(), [(1, b - a, 1)]) for a, b in ((0, 200), (200, 400), (400, 537))]
    assert whole.shape == ref.shape == (50 + 50 + 34, 64)
    assert (whole - ref).abs().max() < 1e-4 * ref.abs().max()
    assert torch.allclose(torch.cat(pieces), whole, atol=1e-5)
