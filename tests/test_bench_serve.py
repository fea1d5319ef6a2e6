"""`omnistream bench serve` on the CPU: a tiny model, a few streaming clients, a few seconds.
Checks the report's fields, zero errors in both phases, and that the server gives the same
greedy answers as the engine in-process (same seeded weights, same requests)."""

from __future__ import annotations

import json
import sys

import pytest

from omnistream.bench.serve import Sample, overhead, parse_mix, summarize
from omnistream.entrypoints.cli import main

ARGS = ["bench", "serve", "--model-config", "tiny", "--device", "cpu", "--clients", "3", "--requests", "6",
        "--new-tokens", "6", "--size", "56", "--video-frames", "4", "--prompt-tokens", "48", "--mix", "text=1,image=1,video=1"]
PHASE_FIELDS = ("requests", "ok", "errors", "output_tokens", "wall_s", "tokens_per_s", "itl_samples", "by_kind",
                *(f"{m}_p{q}_s" for m in ("ttft", "itl", "e2e") for q in (50, 90, 99)))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "serve.json"
    assert main([*ARGS, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_report_fields_and_zero_errors(report):
    for phase in ("http", "in_process"):
        r = report[phase]
        assert set(PHASE_FIELDS) <= set(r), phase
        assert r["requests"] == r["ok"] == 6 and r["errors"] == {}, (phase, r["errors"])
        assert r["output_tokens"] == 6 * 6  # ignore_eos: every answer has --new-tokens tokens
        assert r["tokens_per_s"] > 0 and r["itl_samples"] > 0
        assert 0 < r["ttft_p50_s"] <= r["ttft_p90_s"] <= r["ttft_p99_s"] <= r["e2e_p99_s"]
        assert set(r["by_kind"]) == set(report["workload"]["kinds"])
    assert sum(report["workload"]["kinds"].values()) == 6
    assert set(report["overhead"]) >= {"ttft_p50_delta_s", "ttft_p99_ratio", "tokens_per_s_ratio", "itl_p50_delta_s", "e2e_p99_ratio"}
    assert [t["metric"] for t in report["targets"]] == ["ttft_p50_delta_s", "ttft_p99_ratio", "tokens_per_s_ratio"]
    assert report["server"]["exit_code"] in (0, 130) and "Traceback" not in report["server"]["stderr_tail"]
    assert report["server"]["startup_line"].startswith("omnistream serve: listening on http://127.0.0.1:")


def test_same_greedy_answers_over_http_and_in_process(report):
    assert report["answers"] == {"compared": 6, "equal": 6}


def test_nothing_left_in_the_engine(report):
    stats = report["in_process_engine_stats_after"]
    assert stats["requests_running"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_printed_tables(report, capsys):
    from omnistream.bench.serve import print_report

    print_report(report)
    out = capsys.readouterr().out
    for text in ("HTTP (SSE)", "in-process", "HTTP overhead: TTFT p50", "greedy answers equal over HTTP and in-process: 6/6",
                 "TTFT p50 within 3 ms of in-process", "indicative only"):
        assert text in out, text


def test_statistics_helpers():
    a = Sample(0, "text", sent=0.0, chunk_times=[0.010, 0.020, 0.030], ended=0.030, text="abc", output_tokens=3)
    b = Sample(1, "image", sent=0.0, chunk_times=[0.020, 0.040], ended=0.040, text="ab", output_tokens=2)
    bad = Sample(2, "text", sent=0.0, ended=0.001, error="503")
    s = summarize([a, b, bad], 0.0, 0.05)
    assert s["ok"] == 2 and s["errors"] == {"503": 1} and s["output_tokens"] == 5
    assert s["wall_s"] == pytest.approx(0.040) and s["tokens_per_s"] == pytest.approx(125.0)
    assert s["ttft_p50_s"] == pytest.approx(0.015) and s["itl_p50_s"] == pytest.approx(0.010) and s["itl_samples"] == 3
    o = overhead(s | {"ttft_p50_s": 0.017, "tokens_per_s": 100.0}, s)
    assert o["ttft_p50_delta_s"] == pytest.approx(0.002) and o["tokens_per_s_ratio"] == pytest.approx(0.8)


@pytest.mark.parametrize("bad", ["audio", "text=x", "text=-1", "text=0"])
def test_bad_mix_is_refused(bad):
    with pytest.raises(SystemExit, match="--mix"):
        parse_mix(bad)


def test_short_soak_leaves_nothing_behind(tmp_path):
    """tools/soak_serve.py for 20 s: every client kind, zero 5xx, nothing leaked (the RSS check
    needs the 10-minute run: 20 s is all warm-up)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "soak_serve.py"
    spec = importlib.util.spec_from_file_location("soak_serve", path)
    soak = importlib.util.module_from_spec(spec)
    sys.modules["soak_serve"] = soak  # dataclasses look their module up there
    spec.loader.exec_module(soak)
    out = tmp_path / "soak.json"
    soak.main(["--minutes", str(20 / 60), "--sample-s", "5", "--json", str(out)])
    report = json.loads(out.read_text())
    checks = {c["check"]: c for c in report["checks"]}
    failed = [c for name, c in checks.items() if not c["ok"] and name != "RSS flat after warm-up"]
    assert not failed, failed
    assert {"chat_text", "chat_stream", "chat_image", "chat_video", "disconnect"} <= set(report["done"])
