"""`omnistream ask` on a folder of real-world-like media (several codecs, odd sizes, portrait,
60 fps, a 1-second clip, stills) and on broken files (one-line reason, non-zero exit)."""

from __future__ import annotations

import pytest

from omnistream.entrypoints.cli import main
from omnistream.media.samples import write_broken_corpus, write_media_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_media_corpus(tmp_path_factory.mktemp("media"))


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return write_broken_corpus(tmp_path_factory.mktemp("broken"))


def test_every_media_file_answers(tiny_model_dir, corpus, capsys):
    assert len(corpus) >= 10
    for path in corpus:
        rc = main(["ask", str(path), "What is this?", "--model", str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", "3", "--max-pixels", str(112 * 112)])
        out = capsys.readouterr().out
        assert rc == 0, path
        assert out.startswith("answer: ") and "time to first token" in out, path


def test_broken_files_fail_with_one_line(tiny_model_dir, broken, capsys):
    assert len(broken) >= 4
    for path in broken:
        rc = main(["ask", str(path), "What is this?", "--model", str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", "3"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc != 0, path
        errors = [line for line in err if line.startswith("error: ")]
        assert len(errors) == 1 and len(errors[0]) > 12, (path, err)
        assert not any("Traceback" in line for line in err)


def test_missing_file_and_bad_model(tiny_model_dir, tmp_path, capsys):
    assert main(["ask", str(tmp_path / "nope.mp4"), "q", "--model", str(tiny_model_dir), "--device", "cpu"]) == 2
    assert main(["ask", str(tmp_path / "nope.mp4"), "q", "--model", str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 2
