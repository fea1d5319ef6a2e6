"""`omnistream bench audio` on the CPU with the tiny random Omni thinker and short clips: both
systems in one run, transformers' processor padding to 300 s (and truncating past it), equal
greedy answers in float32, and W1 over a clip with sound encoding the audio and the frames once."""

from __future__ import annotations

import io

import pytest
import torch

pytest.importorskip("transformers")

from omnistream.bench.audio import (  # noqa: E402
    HF_MAX_SECONDS, RATE, hf_audio_tokens, hf_feature_extractor, hf_features, print_audio, run_audio, speech_like, vad_available,
)
from omnistream.entrypoints.cli import main  # noqa: E402
from omnistream.media.vad import audio_tokens  # noqa: E402


@pytest.fixture(scope="module")
def report():
    return run_audio("omni-tiny", "cpu", "float32", [2.0, 5.0], new_tokens=3, seed=0, w1_seconds=4.0, w1_size=56, turns=3,
                     with_vad=True)


def test_clips_side_by_side(report):
    two, five = report["clips"]
    assert two["transformers"]["feature_shape"] == (1, 128, 30000)  # padded to 300 s, whatever the clip
    assert two["transformers"]["padding_ratio"] == 150.0 and five["transformers"]["padding_ratio"] == 60.0
    assert two["omnistream"]["feature_shape"] == (128, 200) and five["omnistream"]["feature_shape"] == (128, 500)
    for c in (two, five):
        assert c["transformers"]["audio_tokens"] == c["omnistream"]["audio_tokens"] == audio_tokens(int(c["seconds"] * RATE))
        assert c["omnistream"]["audio_calls"] == 1 and c["transformers"]["audio_calls"] == 1
        agree = c["equal_tokens_tf_vs_omni"]
        assert agree["equal_tokens"] == agree["compared"] == 3  # float32 on the CPU: the same greedy answer
        assert c["omnistream"]["ttft_s"] > 0 and c["transformers"]["ttft_s"] > c["transformers"]["feature_s"]


@pytest.mark.skipif(not vad_available(), reason="silero-vad not installed")
def test_vad_reports_tokens_saved_and_agreement(report):
    for c in report["clips"]:
        v = c["omnistream_vad"]
        assert 0 < v["audio_tokens"] < c["omnistream"]["audio_tokens"]  # the 2 s pauses are dropped
        assert v["tokens_saved"] == c["omnistream"]["audio_tokens"] - v["audio_tokens"]
        assert v["agreement_with_exact"]["compared"] == 3


def test_w1_with_sound_encodes_once(report):
    w1 = report["w1_av"]
    ours, base = w1["omnistream"], w1["transformers"]
    assert len(ours) == len(base) == 3
    assert ours[0]["audio_calls"] >= 1 and ours[0]["vision_calls"] >= 1
    assert all(r["audio_calls"] == 0 and r["vision_calls"] == 0 for r in ours[1:])  # encoded once, at turn 1
    assert all(r["audio_calls"] == 1 and r["vision_calls"] == 1 for r in base)  # transformers: every turn
    # only the new turn is prefilled: the KV of the previous prompt is reused (whole 16-token blocks)
    assert all(o["cached_tokens"] > p["prompt_tokens"] - 16 for p, o in zip(ours, ours[1:]))
    assert w1["equal_greedy_tokens_per_turn"] == [3, 3, 3]


def test_table_printed(report):
    out = io.StringIO()
    print_audio(report, out)
    text = out.getvalue()
    assert "1x128x30000" in text and "128x200" in text and "W1 with sound" in text and "follow-up TTFT" in text


def test_transformers_truncates_past_300_s():
    """What transformers does with a longer clip: 300 s of features, 7500 tokens, no warning."""
    samples = speech_like(HF_MAX_SECONDS + 6, seed=3)
    inputs, _ = hf_features(hf_feature_extractor(), samples, torch.float32)
    assert tuple(inputs["input_features"].shape) == (1, 128, 30000)
    assert hf_audio_tokens(inputs["feature_attention_mask"]) == 7500
    assert audio_tokens(samples.shape[0]) == 7650  # what the engine encodes: all of it


@pytest.mark.parametrize("argv,message", [
    (["--clips", "0"], "--clips must be positive"),
    ([], "needs a Qwen2.5-Omni model"),
])
def test_cli_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "audio", *argv, *(["--model-config", "omni-tiny"] if argv else [])])
    assert message in str(exc.value)
