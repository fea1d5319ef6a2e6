"""The CLI with audio on the built-in omni-demo model (random Qwen2.5-Omni weights): `ask` on an
audio file and on a video with --audio-in-video (answers equal Engine.generate on the same
messages, greedy), `stream --audio` (equal to a LiveSession fed the same frames and sound), and
the one-line errors: a VL model given audio, bad audio, misplaced flags."""

from __future__ import annotations

import re

import pytest

from omnistream import Engine, SamplingParams
from omnistream.entrypoints.cli import AUDIO_SUFFIXES, main, media_part
from omnistream.entrypoints.stream_cli import AudioTrack
from omnistream.errors import UserInputError
from omnistream.media.samples import write_sample_video
from omnistream.sessions.live import LiveSession
from tests.test_audio import tone, write_audio, write_video_with_audio

CPU = ["--device", "cpu", "--temperature", "0"]
TOKENS = 5
QUESTION = "What is heard?"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("omni-cli")
    return {
        "wav": write_audio(root / "speech.wav", tone(2.5, 16000, freq=300.0), 16000, "pcm_s16le", "s16"),
        "flac": write_audio(root / "speech.flac", tone(1.0, 44100, channels=2), 44100, "flac", "s16"),
        "av": write_video_with_audio(root / "clip.mp4", seconds=3.0, fps=4),
        "silent_video": write_sample_video(root / "mute.mp4", seconds=2, fps=4, width=64, height=64),
        "garbage": _write(root / "noise.wav", b"RIFF" + b"\x07" * 300),
    }


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def engine():
    e = Engine.from_pretrained("omni-demo", kv_cache_tokens=8192)
    yield e
    e.close()


def generate(engine, part) -> str:
    [res] = engine.generate([{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}],
                            SamplingParams(max_new_tokens=TOKENS, temperature=0.0))
    return res.text


def ask(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["ask", *map(str, argv), "--max-new-tokens", str(TOKENS), *CPU])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_parts_by_extension():
    for suffix in (".wav", ".mp3", ".flac", ".ogg", ".m4a"):
        assert suffix in AUDIO_SUFFIXES
        assert media_part(f"x{suffix.upper()}", None, None, None) == {"type": "audio", "audio": f"x{suffix.upper()}"}
    assert media_part("a.mp4", 2.0, None, None, audio_in_video=True)["use_audio_in_video"] is True
    assert "use_audio_in_video" not in media_part("a.mp4", 2.0, None, None)
    for path in ("a.wav", "a.png"):
        with pytest.raises(UserInputError, match="--audio-in-video is for a video file"):
            media_part(path, None, None, None, audio_in_video=True)


def test_ask_audio_file_equals_generate(engine, media, capsys):
    rc, out, err = ask(capsys, media["wav"], QUESTION, "--model", "omni-demo")
    assert rc == 0, err
    assert out.startswith(f"answer: {generate(engine, {'type': 'audio', 'audio': str(media['wav'])})}\n")
    media_tokens = int(re.search(r"of which media\s+(\d+)", out).group(1))
    assert media_tokens == 62  # 2.5 s at true length: 50 for the 2 s chunk, 12 for the last 0.5 s (not padded to 100)
    assert "RANDOM weights" in err and err.count("RANDOM") == 1  # announced once
    rc, out, err = ask(capsys, media["flac"], QUESTION, "--model", "omni-demo")  # 44.1 kHz stereo flac
    assert rc == 0, err
    assert out.startswith(f"answer: {generate(engine, {'type': 'audio', 'audio': str(media['flac'])})}\n")


def test_ask_audio_in_video_equals_generate(engine, media, capsys):
    with_sound = generate(engine, {"type": "video", "video": str(media["av"]), "use_audio_in_video": True})
    rc, out, err = ask(capsys, media["av"], QUESTION, "--model", "omni-demo", "--audio-in-video")
    assert rc == 0, err
    assert out.startswith(f"answer: {with_sound}\n")
    rc, plain, err = ask(capsys, media["av"], QUESTION, "--model", "omni-demo")
    assert rc == 0, err
    tokens = [int(re.search(r"prompt tokens\s+(\d+)", o).group(1)) for o in (out, plain)]
    assert tokens[0] == tokens[1] + 75 + 2  # 3 s of sound (50 + 25 tokens) and <|audio_bos|> <|audio_eos|>


@pytest.mark.parametrize("case", ["vl_model", "garbage", "audio_in_video_on_audio", "video_without_sound"])
def test_one_line_errors(media, capsys, case):
    argv = {
        "vl_model": [media["wav"], QUESTION, "--model", "demo"],
        "garbage": [media["garbage"], QUESTION, "--model", "omni-demo"],
        "audio_in_video_on_audio": [media["wav"], QUESTION, "--model", "omni-demo", "--audio-in-video"],
        "video_without_sound": [media["silent_video"], QUESTION, "--model", "omni-demo", "--audio-in-video"],
    }[case]
    rc, _, err = ask(capsys, *argv)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(errors) == 1, err
    assert "Traceback" not in err
    want = {"vl_model": "does not take audio", "garbage": "not a readable audio file",
            "audio_in_video_on_audio": "--audio-in-video is for a video file", "video_without_sound": "no audio stream"}[case]
    assert want in errors[0], errors[0]


# ------------------------------------------------------------------------------ stream --audio
def stream(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["stream", *map(str, argv), "--speed", "max", "--max-pixels", str(56 * 56),
               "--max-new-tokens", str(TOKENS), *CPU])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("model, flags, clip, want", [
    ("demo", [], "av", "does not take audio"),
    # a clip without sound on a model that does not hear: the model's limit is said first (it
    # said `no audio stream`, a fresh-clone trial)
    ("demo", [], "silent_video", "does not take audio"),
    ("omni-demo", ["--compare"], "av", "--compare answers over frames only"),
])
def test_stream_audio_errors(media, capsys, model, flags, clip, want):
    rc, _, err = stream(capsys, media[clip], "--audio", "--model", model, "--ask", "1:?", *flags)
    assert rc == 2 and want in err and "Traceback" not in err, err


def test_audio_track_pieces():
    track = AudioTrack(list(range(16000)), 16000, start_s=-0.25)  # the first frame 0.25 s into the file
    assert track.until(-0.24) is None  # 10 ms due: less than one audio token (30 ms), waits
    piece, ts = track.until(0.25)
    assert (len(piece), ts) == (8000, -0.25)
    assert track.until(0.26) is None  # 10 ms: less than one audio token, waits for the next piece
    piece, ts = track.until(10.0)  # past the end: the rest of the track
    assert (len(piece), ts, track.seconds_fed) == (8000, 0.25, 1.0)


@pytest.mark.skipif(not hasattr(LiveSession, "add_audio"),
                    reason="LiveSession.add_audio (the live-audio contract) has not landed yet")
def test_stream_audio_equals_a_live_session(engine, media, capsys):
    from omnistream.media.audio import decode_audio
    from omnistream.media.video import decode_video

    rc, out, err = stream(capsys, media["av"], "--audio", "--model", "omni-demo", "--ask", "1.5:What is heard?",
                          "--ask", "9:And now?")
    assert rc == 0, err
    assert "audio track 3.0 s" in out and "audio so far 3.0 s" in out
    answers = re.findall(r"^A: (.*)$", out, re.M)
    # the same frames and sound, fed in-process in the same order
    clip = decode_video(str(media["av"]), fps=2.0, min_frames=2, max_frames=10**7)
    stamps = [float(t) - float(clip.timestamps[0]) for t in clip.timestamps]
    sound = decode_audio(media["av"])
    track = AudioTrack(sound.samples, sound.sampling_rate, start_s=-float(clip.timestamps[0]))
    live = engine.live_session(max_pixels=56 * 56)
    want, fed = [], 0
    try:
        for t_ask, question in ((1.5, "What is heard?"), (9.0, "And now?")):
            while fed < len(stamps) and stamps[fed] <= t_ask:
                if (piece := track.until(stamps[fed])) is not None:
                    live.add_audio(piece[0], piece[1], track.rate)
                live.add_frame(clip.frames[fed], stamps[fed])
                fed += 1
            if (piece := track.until(t_ask)) is not None:
                live.add_audio(piece[0], piece[1], track.rate)
            want.append(live.ask(question, SamplingParams(max_new_tokens=TOKENS, temperature=0.0)).text)
    finally:
        live.close()
    assert answers == want
