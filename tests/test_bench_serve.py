"""`omnistream bench serve` on the CPU: a tiny model, a few streaming clients, a few seconds.
Checks the report's fields, zero errors in both phases, and that the server gives the same
greedy answers as the engine in-process (same seeded weights, same requests): chat completions
with text, images and videos; then pinned sessions (a first question and follow-ups) and live
streams over /v1/realtime (frames and questions), per kind."""

from __future__ import annotations

import json
import sys

import pytest

from omnistream.bench.serve_stats import overhead, summarize
from omnistream.bench.serve_workload import FOLLOWUP, Sample, parse_mix
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
    assert set(report["overhead"]) >= {"ttft_p50_delta_s", "ttft_p99_ratio", "tokens_per_s_ratio", "itl_p50_delta_s", "e2e_p99_ratio",
                                       "outside_p50_delta_s"}
    o = report["overhead"]
    assert abs(o["outside_p50_delta_s"] - (report["http"]["outside_p50_s"] - report["in_process"]["outside_p50_s"])) < 1e-9
    assert [t["metric"] for t in report["targets"]] == ["ttft_p50_delta_s", "ttft_p99_ratio", "tokens_per_s_ratio"]
    assert report["server"]["exit_code"] in (0, 130) and "Traceback" not in report["server"]["stderr_tail"]
    assert report["server"]["startup_line"].startswith("omnistream serve: listening on http://127.0.0.1:")
    for phase in ("http", "in_process"):  # every request's own record, the engine's timings with it
        rows = report["samples"][phase]
        assert len(rows) == 6 and all(r["error"] is None and r["ttft_s"] > 0 and r["output_tokens"] == 6 for r in rows)
        assert all(r["engine"].get("ttft_s") for r in rows) and all(r["sent_s"] >= 0 for r in rows)
    assert all("server_receive_s" in r["engine"] for r in report["samples"]["http"] if r["kind"] == "text")
    # the connection's two ways, from the server's stamps on this host's clock: each a part of
    # every request's time outside the engine, so their medians are at most its median
    h = report["http"]
    assert 0 <= h["to_server_p50_s"] <= h["outside_p50_s"] and 0 <= h["to_client_p50_s"] <= h["outside_p50_s"]


def test_same_greedy_answers_over_http_and_in_process(report):
    a = report["answers"]
    assert (a["compared"], a["equal"], a["not_compared"]) == (6, 6, 0)
    assert {k: v["equal"] for k, v in a["by_kind"].items()} == report["workload"]["kinds"]


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


@pytest.mark.parametrize("bad", ["audio", "text=x", "text=-1", "text=0", "live=-2"])
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


# ------------------------------------------------------------------ sessions and live streams
MIXED = ["bench", "serve", "--model-config", "tiny", "--device", "cpu", "--clients", "3", "--requests", "6",
         "--new-tokens", "6", "--size", "56", "--prompt-tokens", "48", "--mix", "text=1,session=1,live=1",
         "--session-turns", "3", "--live-frames", "6", "--live-fps", "20", "--live-questions", "2"]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "mixed.json"
    assert main([*MIXED, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_sessions_and_live_streams_per_kind(mixed):
    kinds = mixed["workload"]["kinds"]
    assert set(kinds) == {"text", "session", "live"} and sum(kinds.values()) == 6  # seeded: every kind drawn
    timed = {"text": kinds["text"], "session": kinds["session"], "session_followup": 2 * kinds["session"], "live": 2 * kinds["live"]}
    for phase in ("http", "in_process"):
        r = mixed[phase]
        assert set(PHASE_FIELDS) <= set(r), phase
        assert r["errors"] == {} and r["errors_by_kind"] == {}, (phase, r["errors_by_kind"])
        assert {k: v["requests"] for k, v in r["by_kind"].items()} == timed, phase  # a session's first question apart
        assert r["requests"] == r["ok"] == sum(timed.values())
        for kind, k in r["by_kind"].items():
            assert k["ok"] == k["requests"] and k["errors"] == {}, (phase, kind)
            assert 0 < k["ttft_p50_s"] <= k["ttft_p99_s"] and k["e2e_p50_s"] >= k["ttft_p50_s"], (phase, kind)
            assert k["mean_output_tokens"] == 6 or kind == "live", (phase, kind)  # live answers may end at EOS
        followup = r["by_kind"]["session_followup"]
        assert followup["mean_cached_tokens"] > r["by_kind"]["session"]["mean_cached_tokens"]  # from the pinned KV
        assert 0 < r["by_kind"]["live"]["mean_output_tokens"] <= 6
    assert mixed["server"]["exit_code"] in (0, 130) and "Traceback" not in mixed["server"]["stderr_tail"]
    assert mixed["in_process_engine_stats_after"]["sessions"] == 0  # every session and live session closed


def test_session_and_live_answers_equal_over_http_and_in_process(mixed):
    """Sessions: exact. Live (`exact` policy): each answer sees exactly the frames sent before it, both ways."""
    kinds = mixed["workload"]["kinds"]
    a = mixed["answers"]
    assert a["by_kind"]["session"] == {"compared": kinds["session"], "equal": kinds["session"], "not_compared": 0}
    assert a["by_kind"]["session_followup"] == {"compared": 2 * kinds["session"], "equal": 2 * kinds["session"], "not_compared": 0}
    assert a["by_kind"]["live"] == {"compared": 2 * kinds["live"], "equal": 2 * kinds["live"], "not_compared": 0}
    assert a["compared"] == a["equal"] == mixed["http"]["requests"] and a["not_compared"] == 0


def test_mixed_printed_rows(mixed, capsys):
    from omnistream.bench.serve import print_report

    print_report(mixed)
    out = capsys.readouterr().out
    for text in ("per kind (HTTP / in-process)", "session_followup", "sessions: an image + 3 questions",
                 "live: 6 JPEG frames 56x56 at 20 fps, 2 questions, policy exact", "greedy answers equal over HTTP and in-process: 10/10"):
        assert text in out, text


def test_live_script_and_fast_answers_not_compared():
    """The live schedule: question k after its share of the frames; `fast` answers are timing-dependent."""
    from omnistream.bench.serve_stats import equal_answers
    from omnistream.bench.serve_workload import _cuts

    assert _cuts(6, 2) == [3, 6] and _cuts(16, 3) == [5, 11, 16] and _cuts(2, 2) == [1, 2]
    http = [Sample(0, "live", text="a", turn=0, exact=False), Sample(0, "live", text="b", turn=1, exact=False),
            Sample(1, "session", text="x"), Sample(1, FOLLOWUP, text="y", turn=1)]
    local = [Sample(0, "live", text="a", turn=0, exact=False), Sample(0, "live", text="c", turn=1, exact=False),
             Sample(1, "session", text="x"), Sample(1, FOLLOWUP, text="z", turn=1)]
    a = equal_answers(http, local)
    assert (a["compared"], a["equal"], a["not_compared"]) == (2, 1, 2)
    assert a["by_kind"]["live"] == {"compared": 0, "equal": 0, "not_compared": 2}
    assert a["by_kind"][FOLLOWUP] == {"compared": 1, "equal": 0, "not_compared": 0}
