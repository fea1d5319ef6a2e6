"""`omnistream bench concurrency` (W3) end to end through the CLI on the tiny preset (CPU):
clients 1 and 4, the text and video8 mixes, one transformers request per mix, the encoder
interference run with 2 streams. It prints its table, writes JSON, and the 4-client runs really
share forward passes (mean running batch > 1). A smoke test, not a benchmark: no timing is
asserted."""

from __future__ import annotations

import json

import pytest

from omnistream.entrypoints.cli import main

pytest.importorskip("transformers")

ARGS = ["bench", "concurrency", "--model-config", "tiny", "--device", "cpu", "--clients", "1,4", "--mix", "text,video8",
        "--size", "56", "--context-tokens", "64", "--new-tokens", "4", "--baseline-requests", "1",
        "--interference-clients", "2", "--interference-tokens", "16", "--interference-frames", "8", "--warmup-clients", "2"]


def test_concurrency_smoke(tmp_path, capsys):
    path = tmp_path / "concurrency.json"
    assert main([*ARGS, "--json", str(path)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    # progress on stderr: stdout is the report alone, from its header on (a fresh-clone trial)
    assert out.startswith("omnistream bench concurrency:") and "warm-up:" in captured.err, out[:200]
    table = out[out.index("W3 summary"):].splitlines()
    rows = {(line.split()[0], line.split()[1]) for line in table[2:] if line.strip() and not line.startswith(" ")}
    assert {("text", "1"), ("text", "4"), ("video8", "1"), ("video8", "4"), ("interference", "2")} <= rows
    for text in ("decode floor:", "TTFT ms p50/p90/p99", "ITL ms p50/p99", "mean running batch", "transformers one request at a time",
                 "computed: 4 x the measured per-request time", "[encoder interference]", "targets",
                 "scheduling while decoding: prefill tokens per request 128", "vision slice rows off"):  # the CPU default
        assert text in out, text

    r = json.loads(path.read_text())
    assert set(r) >= {"env", "workload", "floor", "configs", "baseline", "interference", "targets", "engine_stats"}
    assert r["workload"]["scheduling"]["vision slice rows"] == "off" and r["workload"]["scheduling"]["cap scope"] == "per_request"
    configs = {(c["mix"], c["clients"]): c for c in r["configs"]}
    assert set(configs) == {("text", 1), ("text", 4), ("video8", 1), ("video8", 4)}
    for (mix, n), c in configs.items():
        assert len(c["requests"]) == n and c["output_tokens"] == 4 * n
        assert c["tokens_per_s"] > 0 and c["ttft_p99_s"] >= c["ttft_p50_s"] > 0 and c["itl_p50_s"] > 0
        assert c["floor_tokens_per_s"] == pytest.approx(n * r["floor"]["bandwidth_bytes_per_s"] / r["floor"]["decoder_weight_bytes"])
        for q in c["requests"]:
            assert len(q["inter_token_s"]) == 3 and q["ttft_s"] > 0
            if mix == "text":  # the follow-up finds its context's KV retained by the session
                assert q["cached_tokens"] > 64 and q["add_video_s"] is None
            else:  # media is preprocessed at add_video, outside the TTFT
                assert q["add_video_s"] > 0 and q["media_tokens"] == 16
    for mix in ("text", "video8"):  # 4 clients' questions share forward passes
        assert configs[(mix, 4)]["mean_running_batch"] > 1, configs[(mix, 4)]["engine_counters"]
        assert configs[(mix, 4)]["engine_counters"]["decode_steps"] > 0
        assert configs[(mix, 1)]["mean_running_batch"] == 1
        b = r["baseline"][mix]
        assert b["requests_measured"] == 1 and b["per_request_s"] > 0 and b["tokens_per_s"] > 0
        assert b["requests"][0]["equal_tokens_to_engine"] == 4  # float32: transformers' answer to the same prompt
        assert configs[(mix, 4)]["baseline_serial_s_computed"] == pytest.approx(4 * b["per_request_s"])
    i = r["interference"]
    assert i["with_clip"]["clip"]["video_tokens"] == 16 and i["with_clip"]["clip"]["ttft_s"] > 0
    assert i["without_clip"]["itl_steady"] and i["with_clip"]["streams_running_at_clip_first_token"] <= 2
    assert i["itl_p99_ratio"] is None or i["itl_p99_ratio"] > 0  # None: no text token fell inside the clip's TTFT
    assert [t["ok"] for t in r["targets"]][:4] == [None] * 4  # those configurations (32/64 clients) did not run


def test_target_lines_print_rates_as_tokens_per_second():
    """tokens_per_s ends in _s: it was printed as milliseconds (7,044,583 ms)."""
    import io

    from omnistream.bench.concurrency import print_table

    r = {"configs": [], "interference": None, "env": {"gpu": "H200"}, "workload": {"model": "3b"},
         "targets": [{"target": "32 text clients >= 8,000 tok/s", "metric": "tokens_per_s", "value": 7044.6, "ok": False},
                     {"target": "32 text clients TTFT p99 <= 150 ms", "metric": "ttft_p99_s", "value": 0.0607, "ok": True}]}
    out = io.StringIO()
    print_table(r, out)
    text = out.getvalue()
    assert "7,045 tok/s  MISSED" in text and "61 ms  ok" in text and "7,044,600" not in text
