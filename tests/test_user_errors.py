"""What a new user hits first on the CPU demo model: a wrong flag or path must end in one
`error: ...` line (exit 2) that names the problem, Ctrl-C must end quietly (exit 130), and
`omnistream demo` must leave nothing behind and generate the same sample every time."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import omnistream
import omnistream.entrypoints.cli as cli
from omnistream.cache.budget import CPU_DEFAULT_KV_TOKENS, activation_reserve_bytes, weight_bytes
from omnistream.config import EngineConfig
from omnistream.engine.sampling import SamplingParams
from omnistream.entrypoints.api import MAX_VISION_PATCHES, Engine
from omnistream.entrypoints.cli import EXIT_INTERRUPTED, main
from omnistream.errors import BudgetError, ConfigError, MediaError, UserInputError
from omnistream.media.resize import smart_resize
from omnistream.media.samples import write_sample_video

REPO = Path(omnistream.__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_sample_video(tmp_path_factory.mktemp("user") / "clip.mp4", seconds=2.0, width=160, height=120)


def _one_error_line(capsys) -> str:
    """The single line the CLI printed for a user error (anything else on stderr fails)."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and not any("Traceback" in line for line in err), err
    return errors[0]


def _ask(media, model_dir, *extra) -> int:
    return main(["ask", str(media), "What is this?", "--model", str(model_dir), "--max-new-tokens", "2", *extra])


def _cli_env(**extra) -> dict[str, str]:
    """Environment of a CLI subprocess: this checkout first on the path, offline, unbuffered."""
    path = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path),
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # the CLI's own default is under test
    return env


def _cli(args, env, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "omnistream.entrypoints.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


# ------------------------------------------------------------------ 1. --device cuda without CUDA


def test_cuda_unavailable_is_one_line_error(tiny_model_dir, clip, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _ask(clip, tiny_model_dir, "--device", "cuda") == 2
    line = _one_error_line(capsys)
    assert "CUDA is not available" in line and "'cuda'" in line, line
    with pytest.raises(ConfigError, match="CUDA is not available"):
        EngineConfig(model="m", device="cuda:0")


def test_cuda_index_out_of_range_and_malformed(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"'cuda:2'.*has 2 \(cuda:0 \.\. cuda:1\)"):
        EngineConfig(model="m", device="cuda:2")
    for bad in ("cuda:x", "cuda:", "gpu", "cuda:-1"):
        with pytest.raises(ConfigError, match="device must be cpu or cuda"):
            EngineConfig(model="m", device=bad)
    assert EngineConfig(model="m", device="cuda:1").device == "cuda:1"


# ------------------------------------------------------------------ 2. --max-pixels 0 / negative / min > max


@pytest.mark.parametrize("value", ["0", "-5", "100"])
def test_max_pixels_out_of_range_is_an_error(tiny_model_dir, clip, value, capsys):
    assert _ask(clip, tiny_model_dir, "--device", "cpu", "--max-pixels", value) == 2
    line = _one_error_line(capsys)
    assert "--max-pixels" in line and f"got {value}" in line and ">= 784" in line, line
    rc = main(["stream", str(clip), "--model", str(tiny_model_dir), "--device", "cpu", "--speed", "max",
               "--max-pixels", value, "--ask", "1:hi"])
    assert rc == 2 and "--max-pixels" in _one_error_line(capsys)


def test_pixel_bounds_contradicting_or_non_positive_are_refused(tiny_model_dir, clip):
    with pytest.raises(MediaError, match="min_pixels <= max_pixels"):
        smart_resize(100, 100, 28, 5000, 1000)
    for hi in (0, -784):
        with pytest.raises(MediaError, match="max_pixels > 0"):
            smart_resize(100, 100, 28, 0, hi)
    with Engine.from_pretrained(tiny_model_dir, device="cpu", kv_cache_tokens=2048) as eng:
        with pytest.raises(ConfigError, match="min_pixels"):
            eng.processor.process_video(str(clip), min_pixels=5000, max_pixels=1000)
        # a live session checks its bounds when it is opened
        with pytest.raises(ConfigError, match="min_pixels"):
            eng.live_session(min_pixels=5000, max_pixels=1000)


# ------------------------------------------------------------------ 3. a directory as media


def test_directory_as_media_says_directory(tiny_model_dir, tmp_path, capsys):
    for name in ("frames", "clip.mp4", "photo.jpg"):
        (tmp_path / name).mkdir()
        assert _ask(tmp_path / name, tiny_model_dir, "--device", "cpu") == 2
        line = _one_error_line(capsys)
        assert "is a directory, not a media file" in line and "not found" not in line, line
    rc = main(["stream", str(tmp_path / "clip.mp4"), "--model", str(tiny_model_dir), "--device", "cpu", "--ask", "1:hi"])
    assert rc == 2 and "is a directory" in _one_error_line(capsys)
    # a real missing file still says so
    assert _ask(tmp_path / "missing.mp4", tiny_model_dir, "--device", "cpu") == 2
    assert "not found" in _one_error_line(capsys)


# ------------------------------------------------------------------ 4. sampling parameters name the bad field


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer >= 1, got 2.5"),
    ({"temperature": -0.5}, "temperature must be a number >= 0 (0: greedy), got -0.5"),
    ({"temperature": float("nan")}, "temperature must be a number >= 0 (0: greedy), got nan"),
    ({"top_p": 0.0}, "top_p must be a number in (0, 1], got 0.0"),
    ({"top_p": 1.5}, "top_p must be a number in (0, 1], got 1.5"),
    ({"top_k": -1}, "top_k must be an integer >= 0 (0: off), got -1"),
    ({"seed": 1.5}, "seed must be an integer or None, got 1.5"),
    ({"seed": "42"}, "seed must be an integer or None, got '42'"),
    ({"stop_token_ids": 5}, "stop_token_ids must be a sequence of token ids (integers >= 0), got 5"),
    ({"stop_token_ids": (1, -2)}, "stop_token_ids must be a sequence of token ids (integers >= 0), got (1, -2)"),
])
def test_sampling_params_name_the_bad_field(kwargs, expected):
    with pytest.raises(UserInputError) as info:
        SamplingParams(**kwargs)
    assert str(info.value) == f"invalid sampling parameters: {expected}"


def test_sampling_params_every_bad_field_and_good_ones():
    with pytest.raises(UserInputError) as info:
        SamplingParams(temperature=-1, top_k=-1, max_new_tokens=0)
    msg = str(info.value)
    assert "temperature" in msg and "top_k" in msg and "max_new_tokens" in msg and "SamplingParams(" not in msg
    assert SamplingParams(stop_token_ids=[7, 8]).stop_token_ids == (7, 8)  # a JSON list is accepted
    assert SamplingParams(temperature=1, top_p=0.5, top_k=3, seed=np.int64(4), max_new_tokens=1).seed == 4


def test_max_new_tokens_zero_names_the_field(tiny_model_dir, clip, capsys):
    assert _ask(clip, tiny_model_dir, "--device", "cpu", "--max-new-tokens", "0") == 2
    line = _one_error_line(capsys)
    assert "--max-new-tokens must be an integer >= 1, got 0" in line and "SamplingParams(" not in line, line


# ------------------------------------------------------------------ 5. Ctrl-C


def _interrupt_after(proc: subprocess.Popen, marker: str, delay: float, timeout: float = 120) -> tuple[str, str]:
    """Waits for `marker` on stdout, sends SIGINT `delay` seconds later; returns (stdout, stderr)."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith(marker):
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=timeout)
    return "".join(seen) + out, err


def test_ctrl_c_in_stream_ends_quietly(tiny_model_dir, tmp_path):
    video = write_sample_video(tmp_path / "camera.mp4", seconds=30.0, fps=4, width=112, height=84)
    proc = _cli(["stream", str(video), "--model", str(tiny_model_dir), "--device", "cpu", "--speed", "1",
                 "--max-pixels", str(56 * 56), "--max-new-tokens", "2", "--ask", "25:What happened?"], _cli_env())
    out, err = _interrupt_after(proc, "stream: ", delay=1.5)
    assert "stream: " in out, (out, err)
    assert proc.returncode == EXIT_INTERRUPTED, (proc.returncode, err)
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err
    assert "A: " not in out  # it really stopped before the question at 25 s


def test_ctrl_c_in_ask_and_demo_ends_quietly(monkeypatch, tmp_path, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_ask", interrupted)  # demo answers through cmd_ask too
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for cmd in (["ask", "x.mp4", "q"], ["demo"]):
        try:
            rc = main(cmd)
        except KeyboardInterrupt:  # escaping, it would stop the whole test session
            pytest.fail(f"KeyboardInterrupt escaped main({cmd})")
        assert rc == EXIT_INTERRUPTED
        assert capsys.readouterr().err.strip() == "interrupted"
    assert os.listdir(tmp_path) == []  # the demo's sample is removed on Ctrl-C as well


# ------------------------------------------------------------------ 6 + 7. demo: nothing left behind, one notice


def test_demo_leaves_no_temp_files_and_notes_random_weights_once(tmp_path):
    tmp, cache = tmp_path / "tmp", tmp_path / "cache"
    tmp.mkdir()
    proc = _cli(["demo", "--device", "cpu", "--max-new-tokens", "2"], _cli_env(TMPDIR=str(tmp), OMNISTREAM_CACHE=str(cache)))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert out.startswith("demo: ") and "answer: " in out
    assert err.lower().count("random weights") == 1 and "RANDOM weights" in err, err
    assert os.listdir(tmp) == []  # neither the sample video nor torch's compile cache


def test_ask_notes_random_weights_once(tiny_model_dir, clip):
    proc = _cli(["ask", str(clip), "q", "--model", str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", "2"], _cli_env())
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert err.lower().count("random weights") == 1 and "RANDOM weights" in err, err


_WRITE_SAMPLE = "import sys; from omnistream.media.samples import write_sample_video as w; w(sys.argv[1], **eval(sys.argv[2]))"


def _affinity(cpus):
    return lambda: os.sched_setaffinity(0, cpus)


@pytest.mark.parametrize(("name", "options"), [("sample.mp4", {}), ("vp9.webm", {"codec": "vp9", "seconds": 1.0}),
                                               ("mpeg4.mkv", {"codec": "mpeg4", "seconds": 1.0})])
def test_sample_video_is_byte_identical_across_runs(tmp_path, name, options):
    """The demo's sample (and the test corpus) must not depend on the run, the time or the
    CPUs the process may use (encoders chose a thread count, hence slices, from them)."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    runs = [None] + ([[cpus[0]], cpus[:2]] if len(cpus) > 1 else [None])
    blobs = []
    for i, cpu_set in enumerate(runs):
        path = tmp_path / f"{i}-{name}"
        kwargs = {"preexec_fn": _affinity(cpu_set)} if cpu_set else {}
        subprocess.run([sys.executable, "-c", _WRITE_SAMPLE, str(path), repr(options)], env=_cli_env(), check=True, **kwargs)
        blobs.append(path.read_bytes())
    assert all(b == blobs[0] for b in blobs[1:])
    assert not re.search(rb"Lav[fc]\d", blobs[0])  # no library versions written: bit-exact muxing


# ------------------------------------------------------------------ 8. memory budget on the CPU


def test_budget_smaller_than_weights_is_refused_on_cpu(tiny_model_dir):
    with pytest.raises(BudgetError, match=r"memory budget 1000 B is too small: it needs at least .*weights \d+\.\d\d MiB"):
        Engine.from_pretrained(tiny_model_dir, device="cpu", memory_budget_bytes=1000)
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="memory_budget_bytes must be positive"):
            Engine.from_pretrained(tiny_model_dir, device="cpu", memory_budget_bytes=bad)


def _pool_tokens(model_dir, **options) -> int:
    with Engine.from_pretrained(model_dir, device="cpu", **options) as eng:
        return eng.stats()["kv_blocks_total"] * eng.cfg.cache.block_size


def test_budget_sizes_the_host_kv_pool(tiny_model_dir, tiny_config):
    assert _pool_tokens(tiny_model_dir) == CPU_DEFAULT_KV_TOKENS  # no budget: as before
    assert _pool_tokens(tiny_model_dir, memory_budget_bytes=64 << 30) == CPU_DEFAULT_KV_TOKENS
    # a budget just above weights + activations gets a small pool, and the engine still answers
    with Engine.from_pretrained(tiny_model_dir, device="cpu") as eng:
        weights = weight_bytes(eng.model, 4)
        reserve = activation_reserve_bytes(eng.model, EngineConfig.from_kwargs("m"), MAX_VISION_PATCHES, 4, graphs=False)
        assert weights == sum(p.numel() * p.element_size() for p in eng.model.parameters())
        per_token = eng.model.kv_spec.bytes_per_token(torch.float32)
    with Engine.from_pretrained(tiny_model_dir, device="cpu", memory_budget_bytes=weights + reserve + 1024 * per_token) as small:
        assert small.stats()["kv_blocks_total"] * 16 == 1024
        [res] = small.generate([[{"role": "user", "content": "hi"}]], SamplingParams(max_new_tokens=2))
        assert len(res.token_ids) >= 1
    # an explicit pool must fit an explicit budget
    with pytest.raises(BudgetError, match="KV cache of 1000000 tokens"):
        Engine.from_pretrained(tiny_model_dir, device="cpu", memory_budget_bytes=weights + reserve, kv_cache_tokens=1_000_000)


def test_ask_checks_its_file_and_rates_before_loading_a_model(tmp_path, capsys, monkeypatch):
    """A missing file or a bad --fps is reported at once: no model is loaded for it (found by a
    fresh-clone trial: 3 s on the demo model, minutes on a real checkpoint)."""
    from omnistream.entrypoints import cli

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "load_engine", no_model)
    assert main(["ask", str(tmp_path / "missing.mp4"), "What?", "--device", "cpu"]) == 2
    assert "not found" in _one_error_line(capsys)
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"not really a video")
    assert main(["ask", str(clip), "What?", "--device", "cpu", "--fps", "0"]) == 2
    assert "--fps must be positive" in _one_error_line(capsys)
    assert main(["ask", str(clip), "What?", "--device", "cpu", "--nframes", "0"]) == 2
    assert "--nframes must round to an even count in [2, 768], got 0" in _one_error_line(capsys)
    # before the model loads (no_model would fail the test), named as the flag (a fresh-clone trial)
    assert main(["ask", str(clip), "What?", "--device", "cpu", "--nframes", "1000"]) == 2
    assert "--nframes must round to an even count in [2, 768], got 1000" in _one_error_line(capsys)
