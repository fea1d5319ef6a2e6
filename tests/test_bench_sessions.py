"""`omnistream bench multiturn | repeat | shared` end to end through the CLI on the tiny preset
(CPU, 4 frames of 56 px = 8 video tokens): they run, print their tables, write JSON with the
expected keys, and show the point of sessions and caches in counts (never in timings):
transformers runs its vision tower on every request, the engine only on the first one for a clip.
A smoke test, not a benchmark."""

from __future__ import annotations

import json

import pytest

from omnistream.entrypoints.api import Engine
from omnistream.entrypoints.cli import main

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not hasattr(Engine, "session"), reason="the session API (Engine.session, Engine.stats) is not there yet")

TINY = ["--model-config", "tiny", "--device", "cpu", "--frames", "4", "--size", "56", "--new-tokens", "4"]
VIDEO_TOKENS = 8


def run_bench(tmp_path, name: str, *extra: str) -> dict:
    path = tmp_path / f"{name}.json"
    assert main(["bench", name, *TINY, *extra, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def assert_baseline_recomputes(rows: list[dict]) -> None:
    for r in rows:  # one vision-tower call over the whole clip per request
        assert r["vision_calls"] == 1 and r["vision_tokens_encoded"] == VIDEO_TOKENS
        assert r["ttft_s"] > 0 and r["prefill_s"] > 0 and len(r["tokens"]) == 4


def test_multiturn(tmp_path, capsys):
    r = run_bench(tmp_path, "multiturn", "--turns", "3")
    out = capsys.readouterr().out
    for text in ("follow-up TTFT", "TTFT turn 3 / turn 2", "vision tower (E2)", "E1 stages", "engine caches"):
        assert text in out
    assert set(r) >= {"env", "workload", "omnistream", "transformers", "summary", "engine_stats"}
    ours, base = r["omnistream"]["turns"], r["transformers"]["turns"]
    assert len(ours) == len(base) == 3
    assert ours[0]["vision_tokens_encoded"] == VIDEO_TOKENS and ours[0]["vision_calls"] == 1
    assert ours[0]["ttft_s"] > ours[0]["vision_encode_s"] > 0 and ours[0]["preprocess_s"] > 0
    for turn in ours[1:]:  # follow-ups: no vision work, the history's KV is reused
        assert turn["vision_tokens_encoded"] == 0 and turn["vision_calls"] == 0
        assert turn["cached_tokens"] > 0 and turn["ttft_s"] > 0
    assert_baseline_recomputes(base)
    for o, b in zip(ours, base):  # the baseline is fed the engine's exact prompt each turn
        assert b["prompt_tokens"] == o["prompt_tokens"]
    s = r["summary"]
    assert s["omnistream"]["vision_tokens_after_turn_1"] == 0 and s["transformers"]["vision_calls"] == 3
    assert s["omnistream"]["follow_up_ttft_s"] > 0 and s["transformers"]["last_over_second_ttft"] > 0
    assert s["engine_peak_gib"] is None  # no device memory on the CPU
    assert s["equal_greedy_tokens_per_turn"] == [4, 4, 4]  # float32: every answer is transformers' answer
    assert set(r["engine_stats"]) >= {"encoder_cache", "prefix_cache", "vision_tokens_encoded"}


def test_repeat(tmp_path, capsys):
    r = run_bench(tmp_path, "repeat")
    assert "second request TTFT" in capsys.readouterr().out
    s = r["systems"]
    assert set(s) == {"transformers", "omnistream_generate", "omnistream_session"}
    assert_baseline_recomputes(s["transformers"])
    for name in ("omnistream_generate", "omnistream_session"):
        first, second = s[name]
        assert first["vision_tokens_encoded"] == VIDEO_TOKENS, name
        assert second["vision_tokens_encoded"] == 0 and second["cached_tokens"] > 0, name
    assert all(v > 0 for v in r["first_over_second_ttft"].values())


def test_shared(tmp_path, capsys):
    r = run_bench(tmp_path, "shared", "--sessions", "2")
    assert "sessions 2..2" in capsys.readouterr().out
    ours, base = r["omnistream"]["sessions"], r["transformers"]["sessions"]
    assert len(ours) == len(base) == 2
    assert ours[0]["vision_tokens_encoded"] == VIDEO_TOKENS
    assert ours[1]["vision_tokens_encoded"] == 0 and ours[1]["prefix_hit_tokens"] > 0
    assert_baseline_recomputes(base)
    assert r["summary"]["omnistream_later_vision_tokens"] == 0
    assert r["summary"]["omnistream_later_prefix_hit_tokens"] > 0
    assert r["summary"]["equal_greedy_tokens_per_session"] == [4, 4]
