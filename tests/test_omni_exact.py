"""The engine on a tiny random Qwen2.5-Omni thinker against transformers'
Qwen2_5OmniThinkerForConditionalGeneration: greedy tokens and logits within 1e-4 (float32), fed
the same unpadded features with the original-rule TMRoPE positions (models/tmrope.py), for audio
alone, image + audio, a video with its audio track, a batch, and a 2-turn conversation whose audio
is hashed and encoded once.

Our engine loads the full checkpoint layout (thinker under "thinker.", talker and token2wav
skipped); transformers loads the thinker-only layout written from the same seed. Positions are
passed explicitly (the model's rope_deltas is shared state); each case also checks that
transformers' own get_rope_index gives the same positions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from omnistream.engine.protocol import EngineRequest
from omnistream.engine.sampling import SamplingParams
from omnistream.entrypoints.api import Engine
from omnistream.media import hashing
from omnistream.media.item import MediaItem
from omnistream.media.patchify import normalize_rows
from omnistream.models.omni_demo import write_omni_model_dir
from omnistream.models.prompt import build_prompt
from omnistream.models.qwen2_5_omni_config import FULL_MODEL_TYPE, THINKER_MODEL_TYPE, omni_preset_config
from tests.conftest import TEST_INIT_STD
from tests.reference import assert_close_logits
from tests.test_audio import write_video_with_audio

GREEDY = SamplingParams(max_new_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def omni_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("omni")
    return {layout: write_omni_model_dir(root / layout, omni_preset_config("omni-tiny", layout), init_std=TEST_INIT_STD)
            for layout in (FULL_MODEL_TYPE, THINKER_MODEL_TYPE)}


@pytest.fixture(scope="module")
def hf_omni(omni_dirs):
    transformers = pytest.importorskip("transformers")
    model = transformers.Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(omni_dirs[THINKER_MODEL_TYPE], dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def engine(omni_dirs):
    eng = Engine.from_pretrained(omni_dirs[FULL_MODEL_TYPE], device="cpu", kv_cache_tokens=16384, block_size=16,
                                 encoder_cache_bytes=64 << 20)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def av_file(tmp_path_factory) -> Path:
    return write_video_with_audio(tmp_path_factory.mktemp("av") / "clip.mp4", seconds=5.0, fps=4)


def _noise(seconds: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    n = int(seconds * 16000)
    x = 0.2 * np.sin(2 * np.pi * (200 + 50 * seed) * np.arange(n) / 16000) + 0.05 * rng.standard_normal(n)
    return {"type": "audio", "audio": {"array": x.astype(np.float32), "sampling_rate": 16000}}


def _user(*parts) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]}


def _image(seed: int) -> dict:
    return {"type": "image", "image": np.random.default_rng(seed).integers(0, 255, (90, 150, 3), dtype=np.uint8)}


def _av(path: Path) -> dict:
    return {"type": "video", "video": str(path), "max_pixels": 112 * 112, "use_audio_in_video": True}


# ------------------------------------------------------------------------------ the oracle


def _hf_inputs(media: list[tuple[int, MediaItem]]) -> dict:
    """Our items as transformers' inputs: unpadded features (every frame valid), pixel rows."""
    items = [m for _, m in media]
    kw: dict = {}
    clips: list[list[MediaItem]] = []  # one per audio source: the items of one block, or one item
    for m in (m for m in items if m.kind == "audio"):
        if clips and m.block_id is not None and clips[-1][-1].block_id == m.block_id:
            clips[-1].append(m)
        else:
            clips.append([m])
    if clips:
        feats = [torch.cat([m.pixel_values for m in c]) for c in clips]  # (frames, mel) each
        longest = max(f.shape[0] for f in feats)
        kw |= {"input_features": torch.stack([torch.nn.functional.pad(f, (0, 0, 0, longest - f.shape[0])).T for f in feats]),
               "feature_attention_mask": torch.stack([(torch.arange(longest) < f.shape[0]).long() for f in feats])}
    videos = [m for m in items if m.kind == "video"]
    if videos:  # one video (its pieces in order)
        t = sum(m.grid_thw[0] for m in videos)
        kw |= {"pixel_values_videos": torch.cat([normalize_rows(m.pixel_values) for m in videos]),
               "video_grid_thw": torch.tensor([[t, *videos[0].grid_thw[1:]]]),
               "video_second_per_grid": torch.tensor([videos[0].second_per_grid_t])}
    images = [m for m in items if m.kind == "image"]
    if images:
        kw |= {"pixel_values": torch.cat([normalize_rows(m.pixel_values) for m in images]),
               "image_grid_thw": torch.tensor([m.grid_thw for m in images])}
    return kw


def reference(hf, engine, prompt_ids: list[int], media, output_ids: list[int]) -> torch.Tensor:
    """transformers' logits for each generated token, with our positions passed explicitly;
    asserts that transformers' own get_rope_index agrees with them."""
    ids = list(prompt_ids) + list(output_ids[:-1])
    positions, next_pos = engine.model.positions(len(prompt_ids), media)
    positions = torch.cat([positions, torch.arange(next_pos, next_pos + len(output_ids) - 1).expand(3, -1)], dim=1)
    kw = _hf_inputs(media)
    frames = kw.get("feature_attention_mask")
    theirs, _ = hf.get_rope_index(torch.tensor([ids]), kw.get("image_grid_thw"), kw.get("video_grid_thw"),
                                  torch.ones(1, len(ids), dtype=torch.long), any(m.block_id and m.kind == "video" for _, m in media),
                                  None if frames is None else frames.sum(-1, keepdim=False), kw.get("video_second_per_grid"))
    assert torch.equal(theirs[:, 0], positions), "transformers' get_rope_index places tokens differently"
    with torch.no_grad():
        out = hf(input_ids=torch.tensor([ids]), position_ids=positions[:, None, :], **kw)
    return out.logits[0, len(prompt_ids) - 1 :].float()


def _check(engine, hf, conversations, sampling=GREEDY):
    results = engine.generate(conversations, sampling, return_logits=True)
    for conv, res in zip(conversations, results):
        items = engine.load_media(conv)
        prompt = build_prompt(engine.tokenizer, conv, items)
        media = [(r.offset, m) for r, m in zip(prompt.ranges, prompt.media)]
        assert prompt.token_ids == engine.request_for(conv).token_ids
        assert_close_logits(res.logits, reference(hf, engine, prompt.token_ids, media, res.token_ids))
    return results


CASES = {
    "audio": lambda av: [_user(_noise(4.7, 1), "What is this sound?")],
    "image_and_audio": lambda av: [_user(_image(2), _noise(3.0, 3), "Relate them.")],
    "video_with_audio": lambda av: [_user(_av(av), "What happens?")],
    "text_audio_text": lambda av: [_user("Listen:", _noise(0.75, 4), "and this:", _noise(2.0, 5), "Same?")],
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(engine, hf_omni, av_file, case):
    _check(engine, hf_omni, [CASES[case](av_file)])


def test_layouts(engine, av_file):
    """Token layout of an audio clip of 2 chunks + a short one, and of a video with its audio
    track (vision_bos, audio_bos, then per 2 s the video's patches and the audio's tokens)."""
    items = engine.load_media([_user(_noise(4.7, 1))])
    assert [(m.kind, m.grid_thw, m.num_tokens, m.source_start) for m in items] == [("audio", (2, 200, 1), 100, 0), ("audio", (1, 70, 1), 17, 100)]
    conv = [_user(_av(av_file))]
    pieces = engine.load_media(conv)
    assert [(m.kind, m.num_tokens) for m in pieces] == [("video", 32), ("audio", 50), ("video", 32), ("audio", 50), ("video", 16), ("audio", 25)]
    tok = engine.tokenizer
    ids = build_prompt(tok, conv, pieces).token_ids
    start = ids.index(tok.vision_start_token_id)
    assert ids[start + 1] == tok.audio_start_token_id and ids[start + 2] == tok.video_token_id
    end = start + 2 + sum(m.num_tokens for m in pieces)
    assert ids[end : end + 2] == [tok.audio_end_token_id, tok.vision_end_token_id]


def test_positions_matter(engine, hf_omni, av_file):
    """Guard: the tiny model notices TMRoPE, or the exactness tests prove little: the video with
    its audio placed on sequential positions gives other logits."""
    conv = [_user(_av(av_file), "What happens?")]
    [res] = engine.generate([conv], GREEDY, return_logits=True)
    prompt = build_prompt(engine.tokenizer, conv, engine.load_media(conv))
    media = [(r.offset, m) for r, m in zip(prompt.ranges, prompt.media)]
    ids = prompt.token_ids + res.token_ids[:-1]
    flat = torch.arange(len(ids)).expand(3, -1)
    with torch.no_grad():
        shifted = hf_omni(input_ids=torch.tensor([ids]), position_ids=flat[:, None, :], **_hf_inputs(media)).logits[0, len(prompt.token_ids) - 1 :]
    ref = torch.stack(res.logits)
    assert ((ref - shifted).norm() / ref.norm()).item() > 1e-3


def test_batch(tiny_budget_engine, hf_omni, av_file):
    """Several conversations at once, prompts computed in chunks of 48 tokens (audio and video
    encoded a chunk's worth at a time): the same logits as transformers, each."""
    convs = [CASES[c](av_file) for c in CASES] + [[_user("Only text here.")], [_user(_noise(1.0, 9), "Short one?")]]
    _check(tiny_budget_engine, hf_omni, convs)


@pytest.fixture(scope="module")
def tiny_budget_engine(omni_dirs):
    eng = Engine.from_pretrained(omni_dirs[FULL_MODEL_TYPE], device="cpu", kv_cache_tokens=16384, block_size=16,
                                 max_num_batched_tokens=48, enable_chunked_prefill=True)
    yield eng
    eng.close()


def test_two_turns_hash_and_encode_once(engine, hf_omni, tmp_path):
    """A conversation over a video with sound: its media is hashed once (at ingestion), encoded
    once (turn 2 reuses turn 1's KV: it computes only its own tokens), and a new conversation
    about the same clip finds every audio and video chunk in the encoder cache."""
    tok = engine.tokenizer
    clip = write_video_with_audio(tmp_path / "turns.mp4", seconds=4.5, fps=4, seed=7)  # nothing cached yet
    hashed = hashing.STATS.items_hashed
    turn1 = [_user(_av(clip), "What happens?")]
    items = engine.load_media(turn1)  # hashed here: the video, and the audio track's 2 s chunks + last chunk
    assert hashing.STATS.items_hashed - hashed == 3
    hashed = hashing.STATS.items_hashed
    prompt = build_prompt(tok, turn1, items)
    media = [(r.offset, m) for r, m in zip(prompt.ranges, prompt.media)]
    encoded = engine.vision_tokens_encoded
    [r1] = engine.run([EngineRequest(prompt.token_ids, media, GREEDY, return_logits=True)])
    assert engine.vision_tokens_encoded - encoded == sum(m.num_tokens for m in items)
    assert_close_logits(r1.logits, reference(hf_omni, engine, prompt.token_ids, media, r1.token_ids))

    follow = tok.encode("<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n")
    ids2 = prompt.token_ids + r1.token_ids + [tok.im_end_token_id] + tok.encode("\n") + follow
    encoded = engine.vision_tokens_encoded
    [r2] = engine.run([EngineRequest(ids2, media, GREEDY, return_logits=True)])  # the same items: no new hash
    assert engine.vision_tokens_encoded == encoded, "turn 2 encoded media again"
    assert r2.metrics.cached_tokens >= len(prompt.token_ids) // 16 * 16
    assert_close_logits(r2.logits, reference(hf_omni, engine, ids2, media, r2.token_ids))
    assert hashing.STATS.items_hashed == hashed

    other = [{"role": "system", "content": "Be brief."}, _user(_av(clip), "Anything loud?")]
    stats = engine.stats()["encoder_cache"]
    _check(engine, hf_omni, [other])
    after = engine.stats()["encoder_cache"]
    chunks = sum(m.grid_thw[0] for m in items)  # video temporal patches + audio chunks
    assert (after["misses"], after["hits"] - stats["hits"]) == (stats["misses"], chunks)
    assert engine.vision_tokens_encoded == encoded


def test_audio_without_audio_model_is_refused(tiny_model_dir):
    from omnistream.errors import UserInputError

    eng = Engine.from_pretrained(tiny_model_dir, device="cpu", kv_cache_tokens=1024, block_size=16)
    try:
        with pytest.raises(UserInputError, match="does not take audio"):
            eng.generate([[_user(_noise(1.0, 0), "Hm?")]], GREEDY)
    finally:
        eng.close()


def test_a_video_with_its_sound_is_encoded_in_one_forward_per_encoder(omni_dirs, av_file):
    """Audio-in-video pieces alternate video and audio every 2 s; grouping only neighbours ran
    one encoder forward per piece (6 for this 5 s clip), now one per encoder."""
    eng = Engine.from_pretrained(omni_dirs[FULL_MODEL_TYPE], device="cpu", kv_cache_tokens=16384, block_size=16,
                                 enable_prefix_caching=False)
    model = eng.llm.runner.model
    calls = []
    encode = model.encode_media

    def counting(pixels, grids, kind="video"):
        calls.append(kind)
        return encode(pixels, grids, kind)

    model.encode_media = counting
    try:
        eng.generate([_user(_av(av_file), "Describe it.")], SamplingParams(max_new_tokens=1))
    finally:
        eng.close()
    assert sorted(calls) == ["audio", "video"], calls
