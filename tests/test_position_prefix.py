"""Positions reused across a session's turns (models/position_prefix.py): a sequence's positions
computed from a known prefix equal those computed from scratch, for M-RoPE (image + video) and
TMRoPE (audio in video), and a prefix that ends inside media is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnistream.entrypoints.api import Engine
from omnistream.models.position_prefix import extend_positions, text_positions
from omnistream.models.prompt import build_prompt
from tests.test_audio import write_video_with_audio
from tests.test_omni_exact import omni_dirs  # noqa: F401 - fixture

def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (70, 98, 3), dtype=np.uint8)


def _check_every_cut(model, ids: list[int], media) -> int:
    """Cut the sequence at every text token away from media: prefix + rest == whole."""
    whole, next_pos = model.positions(len(ids), media)
    cuts = 0
    for n in range(0, len(ids) + 1):
        try:
            known = model.positions(n, [(o, m) for o, m in media if o + m.num_tokens <= n])
            got, nxt = extend_positions(model, known, len(ids), media)
        except ValueError:
            continue  # a cut inside a media block: refused (tested below)
        assert torch.equal(got, whole) and nxt == next_pos, f"cut at {n}"
        cuts += 1
    return cuts


def _conversation(engine, content: list[dict]):
    conv = [{"role": "user", "content": content}]
    prompt = build_prompt(engine.tokenizer, conv, engine.load_media(conv))
    return prompt.token_ids, [(r.offset, m) for r, m in zip(prompt.ranges, prompt.media)]


def test_mrope_prefix_plus_rest_equals_whole(tiny_model_dir):
    engine = Engine.from_pretrained(tiny_model_dir, device="cpu", kv_cache_tokens=4096)
    frames = [np.roll(_image(1), 5 * i, axis=1) for i in range(6)]
    ids, media = _conversation(engine, [
        {"type": "image", "image": _image(2)}, {"type": "text", "text": "and"},
        {"type": "video", "video": {"frames": frames, "timestamps": [i / 2 for i in range(6)]}, "max_pixels": 112 * 112},
        {"type": "text", "text": "What happens?"}])
    assert _check_every_cut(engine.model, ids, media) > 10
    off, item = media[1]
    known = engine.model.positions(off + 1, media[:1])
    with pytest.raises(ValueError, match="inside or next to a media placeholder"):
        extend_positions(engine.model, known, len(ids), media)
    with pytest.raises(ValueError, match="cover"):
        extend_positions(engine.model, engine.model.positions(len(ids) + 1, media), len(ids), media)


def test_tmrope_audio_in_video_prefix_plus_rest_equals_whole(omni_dirs, tmp_path):  # noqa: F811
    engine = Engine.from_pretrained(next(iter(omni_dirs.values())), device="cpu", kv_cache_tokens=8192)
    clip = write_video_with_audio(tmp_path / "clip.mp4", seconds=5.0, fps=4, seed=3)
    ids, media = _conversation(engine, [
        {"type": "text", "text": "Listen:"},
        {"type": "video", "video": str(clip), "max_pixels": 112 * 112, "use_audio_in_video": True},
        {"type": "text", "text": "What do you hear and see?"}])
    assert {m.kind for _, m in media} == {"video", "audio"}
    assert _check_every_cut(engine.model, ids, media) > 5


def test_text_positions_continue_every_axis():
    known = (torch.zeros(3, 2, dtype=torch.long), 7)
    pos, nxt = text_positions(known, 3)
    assert pos[:, 2:].tolist() == [[7, 8, 9]] * 3 and nxt == 10
