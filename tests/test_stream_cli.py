"""`omnistream stream` (a file played as a live camera, --compare with transformers) and the
`omnistream bench stream` smoke run on the tiny model."""

from __future__ import annotations

import json
import re

import pytest

from omnistream.entrypoints.cli import main
from omnistream.media.samples import write_sample_video


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_sample_video(tmp_path_factory.mktemp("stream") / "clip.mp4", seconds=6.0, fps=10)


def test_stream_two_questions_with_compare(tiny_model_dir, video, capsys):
    pytest.importorskip("transformers")
    rc = main(["stream", str(video), "--model", str(tiny_model_dir), "--device", "cpu", "--speed", "max",
               "--max-pixels", str(56 * 56), "--max-new-tokens", "4", "--compare",
               "--ask", "2:What is happening?", "--ask", "5:And now?"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.startswith("stream: ")
    assert "[t=2.0s]" in out and "Q: What is happening?" in out and "[t=5.0s]" in out and "Q: And now?" in out
    assert len(re.findall(r"^A: ", out, re.M)) == 2
    for key in ("total_latency", "encoding_latency", "prefill_latency", "generation_latency", "frames_encoded",
                "visual_tokens", "kv_cache_length", "star_size", "stream_size", "compression_ratio", "ttft_s"):
        assert len(re.findall(rf"^\s+{key}\s", out, re.M)) == 2, key
    # transformers over the retained frames (the engine's exact prompt) agrees token for token in float32
    retained = re.findall(r"transformers, retained frames\s.*?(\d+)/(\d+) \(identical\)", out)
    assert len(retained) == 2 and all(a == b == "4" for a, b in retained), out
    assert len(re.findall(r"transformers, all frames so far\s+\d+\s+\d+", out)) == 2


def test_stream_policy_fast_with_compare(tiny_model_dir, video, capsys):
    pytest.importorskip("transformers")
    rc = main(["stream", str(video), "--model", str(tiny_model_dir), "--device", "cpu", "--speed", "max", "--policy", "fast",
               "--max-pixels", str(56 * 56), "--max-new-tokens", "3", "--compare", "--ask", "2:What?", "--ask", "5:Now?"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert len(re.findall(r"^A: ", out, re.M)) == 2
    assert len(re.findall(r"omnistream \(live, fast\)", out)) == 2 and len(re.findall(r"^\s+policy\s+fast", out, re.M)) == 2
    assert len(re.findall(r"transformers, retained frames\s.*?\d+/3", out)) == 2


def test_stream_real_time_speed(tiny_model_dir, video, capsys):
    rc = main(["stream", str(video), "--model", str(tiny_model_dir), "--device", "cpu", "--speed", "1",
               "--max-pixels", str(56 * 56), "--max-new-tokens", "2", "--ask", "1:Now?"])
    out = capsys.readouterr().out
    assert rc == 0 and "[t=1.0s]" in out and "A: " in out


def test_stream_bad_inputs_fail_with_one_line(tiny_model_dir, tmp_path, video, capsys):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00not a video" * 400)
    cases = [[str(bad), "--ask", "1:hi"], [str(tmp_path / "missing.mp4"), "--ask", "1:hi"],
             [str(video), "--ask", "no time"], [str(video), "--ask", "1:hi", "--speed", "2"]]
    for case in cases:
        rc = main(["stream", *case, "--model", str(tiny_model_dir), "--device", "cpu"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, case
        assert len(err) == 1 and err[0].startswith("error: "), (case, err)


def test_bench_stream_smoke(tmp_path, capsys):
    pytest.importorskip("transformers")
    path = tmp_path / "stream.json"
    rc = main(["bench", "stream", "--model-config", "tiny", "--device", "cpu", "--size", "56", "--minutes", "1",
               "--new-tokens", "2", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "TTFT no-new exact" in out and "TTFT 2-new fast" in out and "seed TTFT" in out and "target" in out
    assert "divergence of policy fast from exact" in out and "logits rel. L2 error" in out
    r = json.loads(path.read_text())
    assert {"env", "workload", "ingest", "lengths", "targets"} <= set(r)
    assert [(g["prefill_on_arrival"], g["policy"]) for g in r["ingest"]] == [(False, "exact"), (True, "exact"), (True, "fast")]
    assert all(g["frames_per_s"] > 0 for g in r["ingest"])
    [row] = r["lengths"]
    assert row["frames_fed"] == 120 and row["seed_ttft_s"] > 0 and "allocated_gib" in row
    for policy in ("exact", "fast"):
        p = row[policy]
        for key in ("ingest_fps", "ttft_no_new_s", "ttft_after_new_s", "star_size", "stream_size", "compression_ratio"):
            assert key in p, key
        assert p["frames_added"] == 120 + 2 * 3 and p["no_new_frames_encoded"] == 0
        assert len(p["ttft_after_new_samples_s"]) == 3
        assert p["after_new_frames_encoded"] == 2  # the question encoded the 2 frames it waited for (new camera)
        assert 0 < p["star_size"] <= 20 and 0 < p["stream_size"] <= 20
    d = row["divergence"]
    assert d["tokens"] == 2 and 0 <= d["tokens_equal"] <= 2 and d["logit_rel_err"] >= 0
