"""The opt-in, lossy VAD (media/vad.py): silent stretches dropped before encoding, the tokens
saved reported; an audio part with "vad": true is exactly the engine's answer on the kept
samples; clear errors for no speech, a video part, and a missing package."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("silero_vad")

from omnistream.bench.audio import speech_like  # noqa: E402
from omnistream.engine.sampling import SamplingParams  # noqa: E402
from omnistream.entrypoints.api import Engine  # noqa: E402
from omnistream.errors import ConfigError, MediaError, UserInputError  # noqa: E402
from omnistream.media import vad  # noqa: E402
from omnistream.media.audio import AudioClip  # noqa: E402
from omnistream.models.omni_demo import write_omni_model_dir  # noqa: E402
from omnistream.models.qwen2_5_omni_config import omni_preset_config  # noqa: E402
from tests.conftest import TEST_INIT_STD  # noqa: E402

RATE = 16000
GREEDY = SamplingParams(max_new_tokens=4, ignore_eos=True)


def quiet(seconds: float, seed: int) -> np.ndarray:
    return (0.003 * np.random.default_rng(seed).standard_normal(int(seconds * RATE))).astype(np.float32)


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    """1 s quiet, 3 s of syllables, 3 s quiet, 3 s of syllables, 1 s quiet."""
    speech = lambda s, seed: speech_like(s, seed)[: int(s * RATE)]  # a 3 s cut of a phrase: all syllables
    return np.concatenate([quiet(1, 1), speech(3, 2), quiet(3, 3), speech(3, 4), quiet(1, 5)])


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir = write_omni_model_dir(tmp_path_factory.mktemp("omni-vad") / "m", omni_preset_config("omni-tiny"), init_std=TEST_INIT_STD)
    eng = Engine.from_pretrained(model_dir, device="cpu", kv_cache_tokens=4096)
    yield eng
    eng.close()


def test_drops_the_quiet_stretches(clip):
    r = vad.drop_silence(AudioClip(clip, RATE, RATE))
    phrases = [(1 * RATE, 4 * RATE), (7 * RATE, 10 * RATE)]
    pad = int(0.15 * RATE)  # Silero's speech_pad_ms (100) and its 32 ms windows
    for lo, hi in phrases:  # each phrase is heard, and every kept segment lies inside one
        assert any(a < hi and b > lo for a, b in r.segments)
    assert all(any(lo - pad <= a and b <= hi + pad for lo, hi in phrases) for a, b in r.segments)
    assert np.array_equal(r.samples, np.concatenate([clip[a:b] for a, b in r.segments]))  # kept as they are, in order
    assert r.audio_tokens_before == 275 and r.audio_tokens_after == vad.audio_tokens(r.samples.shape[0]) < 200
    assert r.tokens_saved == r.audio_tokens_before - r.audio_tokens_after
    assert "VAD (lossy)" in r.summary() and f"saved {r.tokens_saved}" in r.summary()


def test_import_keeps_torch_threads():
    """Importing silero_vad sets torch to 1 thread process-wide; loading the VAD must not."""
    vad._silero.cache_clear()
    for name in [m for m in sys.modules if m.startswith("silero_vad")]:
        del sys.modules[name]
    before = torch.get_num_threads()
    vad._silero()
    assert torch.get_num_threads() == before


def test_audio_part_with_vad_is_the_answer_on_the_kept_samples(engine, clip, caplog):
    part = {"type": "audio", "audio": {"array": clip, "sampling_rate": RATE}}
    with caplog.at_level(logging.INFO, logger="omnistream.media.vad"):
        [lossy] = engine.generate([[{"role": "user", "content": [{**part, "vad": True}, {"type": "text", "text": "Who speaks?"}]}]],
                                  GREEDY, return_logits=True)
    assert "VAD (lossy)" in caplog.text
    kept = vad.drop_silence(AudioClip(clip, RATE, RATE))
    by_hand = {"type": "audio", "audio": {"array": kept.samples, "sampling_rate": RATE}}
    [ref] = engine.generate([[{"role": "user", "content": [by_hand, {"type": "text", "text": "Who speaks?"}]}]], GREEDY, return_logits=True)
    [exact] = engine.generate([[{"role": "user", "content": [part, {"type": "text", "text": "Who speaks?"}]}]], GREEDY)
    assert lossy.token_ids == ref.token_ids
    torch.testing.assert_close(torch.stack(lossy.logits), torch.stack(ref.logits), rtol=0, atol=1e-5)
    assert lossy.metrics.media_tokens == kept.audio_tokens_after < exact.metrics.media_tokens == kept.audio_tokens_before


def test_file_source(engine, clip, tmp_path):
    from omnistream.bench.audio import write_wav

    path = write_wav(tmp_path / "c.wav", clip)
    src, r = vad.vad_source(str(path), engine.model.audio_config)
    assert src["sampling_rate"] == RATE and src["array"] is r.samples and r.tokens_saved > 0


def test_no_speech_is_refused(engine):
    msg = [{"role": "user", "content": [{"type": "audio", "audio": {"array": quiet(3, 9), "sampling_rate": RATE}, "vad": True}]}]
    with pytest.raises(MediaError, match="the VAD found no speech in 3.0 s of audio"):
        engine.request_for(msg)


def test_vad_on_a_video_part_is_refused(engine):
    frames = [np.zeros((56, 56, 3), np.uint8)] * 2
    msg = [{"role": "user", "content": [{"type": "video", "video": {"frames": frames, "timestamps": [0.0, 0.5]}, "vad": True}]}]
    with pytest.raises(UserInputError, match='"vad" applies to audio parts'):
        engine.request_for(msg)


def test_missing_package_is_a_clear_error(monkeypatch):
    vad._silero.cache_clear()
    monkeypatch.setitem(sys.modules, "silero_vad", None)  # import fails as if not installed
    try:
        with pytest.raises(ConfigError, match=r"pip install 'omnistream\[vad\]'"):
            vad._silero()
    finally:
        vad._silero.cache_clear()


def test_config_is_checked():
    with pytest.raises(ConfigError, match="threshold"):
        vad.VadConfig(threshold=1.5)
    with pytest.raises(ConfigError, match="min_silence_ms"):
        vad.VadConfig(min_silence_ms=-1)
