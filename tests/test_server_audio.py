"""Audio at the server, end to end on the built-in omni-demo model (random Qwen2.5-Omni weights):
chat completions with `input_audio` (OpenAI's part) and `audio_url` (vLLM's), `video_url` with
`use_audio_in_video` (on the part or in mm_processor_kwargs), through the real `openai` client,
each answer equal to Engine.generate on the same messages (greedy); re-sent audio decoded once;
bad audio refused with a 4xx while the server goes on; a VL server refusing audio; the realtime
socket's input_audio_buffer.append / .clear."""

from __future__ import annotations

import base64
import json

import numpy as np
import openai
import pytest
import websocket

from omnistream import Engine, SamplingParams
from omnistream.server.app import build_app
from omnistream.server.config import ServerConfig
from omnistream.sessions.live import LiveSession
from tests.server_util import serve
from tests.test_audio import tone, write_audio, write_video_with_audio

GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
TOKENS = 6
LIVE_AUDIO = pytest.mark.skipif(not hasattr(LiveSession, "add_audio"),
                                reason="LiveSession.add_audio (the live-audio contract) has not landed yet")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio-media")
    speech = 0.6 * tone(2.5, 16000, freq=330.0)
    return {
        "root": root,
        "wav": write_audio(root / "speech.wav", speech, 16000, "pcm_s16le", "s16"),
        "mp3": write_audio(root / "speech.mp3", speech, 16000, "libmp3lame", "fltp"),
        "long": write_audio(root / "long.wav", tone(3.5, 16000), 16000, "pcm_s16le", "s16"),
        "av": write_video_with_audio(root / "clip.mp4", seconds=2.0, fps=4),
    }


@pytest.fixture(scope="module")
def engine():
    e = Engine.from_pretrained("omni-demo", kv_cache_tokens=8192, engine_process=True)  # as `omnistream serve` runs it
    yield e
    e.close()


@pytest.fixture(scope="module")
def base_url(engine, media):
    config = ServerConfig(allowed_media_path=media["root"], max_audio_seconds=3.0)
    with serve(build_app(engine, config)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def ask(client, parts, **kw):
    kw = {**GREEDY, **kw, "extra_body": {**GREEDY["extra_body"], **kw.get("extra_body", {})}}
    return client.chat.completions.create(model="omni-demo-model", max_tokens=TOKENS, **kw,
                                          messages=[{"role": "user", "content": [*parts, {"type": "text", "text": "What is heard?"}]}])


def engine_text(engine, part) -> str:
    [res] = engine.generate([{"role": "user", "content": [part, {"type": "text", "text": "What is heard?"}]}],
                            SamplingParams(max_new_tokens=TOKENS, temperature=0.0, ignore_eos=True))
    return res.text


def test_input_audio_equals_engine_and_is_decoded_once(client, engine, media):
    want = engine_text(engine, {"type": "audio", "audio": str(media["wav"])})
    part = {"type": "input_audio", "input_audio": {"data": b64(media["wav"]), "format": "wav"}}
    first = ask(client, [part])
    assert first.choices[0].message.content == want
    assert first.usage.prompt_tokens > 50  # 2.5 s of sound: 62 audio tokens
    again = ask(client, [part])  # a stateless client re-sends the clip: recognised by its bytes
    assert again.choices[0].message.content == want
    assert again.model_extra["metrics"]["media_items_reused"] == 1
    assert again.model_extra["metrics"]["media_decode_s"] == 0.0
    assert again.usage.prompt_tokens_details.cached_tokens > 50
    stream = ask(client, [part], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want


def test_audio_url_data_and_path(client, engine, media):
    want = engine_text(engine, {"type": "audio", "audio": str(media["mp3"])})
    data = {"type": "audio_url", "audio_url": {"url": "data:audio/mpeg;base64," + b64(media["mp3"])}}
    assert ask(client, [data]).choices[0].message.content == want
    path = {"type": "audio_url", "audio_url": {"url": "speech.mp3"}}  # relative to --allowed-media-path
    assert ask(client, [path]).choices[0].message.content == want


def test_two_equal_clips_in_a_row_stay_two(client, engine, media):
    """A reused clip is 2 items (whole chunks + a shorter last one) sharing a block id: the same
    clip twice must still fill two placeholders."""
    part = {"type": "input_audio", "input_audio": {"data": b64(media["wav"]), "format": "wav"}}
    conv = [{"type": "audio", "audio": str(media["wav"])}] * 2
    [res] = engine.generate([{"role": "user", "content": [*conv, {"type": "text", "text": "What is heard?"}]}],
                            SamplingParams(max_new_tokens=TOKENS, temperature=0.0, ignore_eos=True))
    assert ask(client, [part, part]).choices[0].message.content == res.text


def test_video_with_its_audio(client, engine, media):
    want = engine_text(engine, {"type": "video", "video": str(media["av"]), "use_audio_in_video": True})
    assert want != engine_text(engine, {"type": "video", "video": str(media["av"])})  # the sound is in the prompt
    on_part = {"type": "video_url", "video_url": {"url": "clip.mp4", "use_audio_in_video": True}}
    assert ask(client, [on_part]).choices[0].message.content == want
    plain = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + b64(media["av"])}}
    res = ask(client, [plain], extra_body={"mm_processor_kwargs": {"use_audio_in_video": True}})
    assert res.choices[0].message.content == want


@pytest.mark.parametrize("part, status, code", [
    ({"type": "input_audio", "input_audio": {"data": "not base64!", "format": "wav"}}, 400, "invalid_base64"),
    ({"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFF" + b"\x01" * 400).decode(), "format": "wav"}},
     400, None),
    ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, 400, None),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "aiff"}}, 400, None),
    ({"type": "audio_url", "audio_url": {"url": "long.wav"}}, 413, None),  # 3.5 s over the 3 s limit
    ({"type": "audio_url", "audio_url": {"url": "clip.mp4.missing"}}, 400, None),
    ({"type": "audio_url", "audio_url": {"url": "/etc/passwd"}}, 403, "media_path_forbidden"),
])
def test_bad_audio_is_a_4xx_and_the_server_goes_on(client, media, part, status, code):
    with pytest.raises(openai.APIStatusError) as err:
        ask(client, [part])
    assert err.value.status_code == status, err.value.body
    if code is not None:
        assert err.value.body["code"] == code
    if part.get("input_audio", {}).get("format") != "aiff":  # that one fails validation, naming the field
        assert err.value.body["message"].startswith("messages[0].content[0]: "), err.value.body
    good = {"type": "input_audio", "input_audio": {"data": b64(media["wav"]), "format": "wav"}}
    assert ask(client, [good]).choices[0].finish_reason == "length"


def test_not_audio_names_the_part(client):
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"\x00garbage" * 64).decode(), "format": "mp3"}}
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, [part])
    message = err.value.body["message"]
    assert message.startswith("messages[0].content[0]: ") and "input_audio" in message
    assert "/tmp" not in message  # never a server-side temp path


# ------------------------------------------------------------------------------ a VL server
@pytest.fixture(scope="module")
def vl_url(media):
    with Engine.from_pretrained("demo") as vl, serve(build_app(vl, ServerConfig(allowed_media_path=media["root"]))) as url:
        yield url


def test_vl_server_refuses_audio(vl_url, media):
    vl = openai.OpenAI(base_url=vl_url + "/v1", api_key="unused", max_retries=0)
    parts = [{"type": "input_audio", "input_audio": {"data": b64(media["wav"]), "format": "wav"}},
             {"type": "video_url", "video_url": {"url": "clip.mp4", "use_audio_in_video": True}}]
    for part in parts:
        with pytest.raises(openai.BadRequestError) as err:
            vl.chat.completions.create(model="demo-model", max_tokens=2, messages=[{"role": "user", "content": [part]}])
        assert err.value.body["code"] == "audio_not_supported"
    ok = vl.chat.completions.create(model="demo-model", max_tokens=2, messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "clip.mp4"}}, {"type": "text", "text": "?"}]}])
    assert ok.choices[0].message.content is not None
    ws = Socket(vl_url)
    ws.send("input_audio_buffer.append", audio=pcm16(0.5))
    assert ws.until("error")["error"]["code"] == "audio_not_supported"
    ws.close()


# ------------------------------------------------------------------------------ realtime
def pcm16(seconds: float, freq: float = 440.0) -> str:
    x = (0.3 * np.sin(2 * np.pi * freq * np.arange(int(seconds * 16000)) / 16000) * 32767).astype("<i2")
    return base64.b64encode(x.tobytes()).decode()


class Socket:
    def __init__(self, url: str) -> None:
        self.ws = websocket.create_connection(url.replace("http", "ws") + "/v1/realtime", timeout=60)
        self.created = json.loads(self.ws.recv())

    def send(self, type_: str, **fields) -> None:
        self.ws.send(json.dumps({"type": type_, **fields}))

    def until(self, type_: str) -> dict:
        while True:
            ev = json.loads(self.ws.recv())
            if ev["type"] in (type_, "error"):
                return ev

    def close(self) -> None:
        self.ws.close()


@pytest.mark.parametrize("fields, code", [
    ({}, "missing_audio"),
    ({"audio": "%%%"}, "invalid_base64"),
    ({"audio": base64.b64encode(b"\x01\x02\x03").decode()}, "invalid_audio"),
    ({"audio": pcm16(0.1), "timestamp_ms": -5}, "invalid_timestamp"),
])
def test_realtime_bad_audio_events(base_url, fields, code):
    ws = Socket(base_url)
    assert ws.created["session"]["input_audio_format"] == "pcm16"
    ws.send("input_audio_buffer.append", **fields)
    assert ws.until("error")["error"]["code"] == code
    ws.send("input_audio_buffer.clear")  # the socket goes on
    assert ws.until("input_audio_buffer.cleared")["type"] == "input_audio_buffer.cleared"
    ws.close()


def test_realtime_audio_timestamps_never_go_back(base_url):
    ws = Socket(base_url)
    ws.send("input_audio_buffer.append", audio=pcm16(0.5), timestamp_ms=1000)
    ws.send("input_audio_buffer.append", audio=pcm16(0.5), timestamp_ms=1200)  # before 1500, where the first ends
    assert ws.until("error")["error"]["code"] == "invalid_timestamp"
    ws.close()


@LIVE_AUDIO
def test_realtime_audio_answer_equals_a_live_session(base_url, engine):
    """Frames and sound over the socket answer as an in-process LiveSession fed the same."""
    from tests.test_server_realtime import png, scene_frames

    frames = scene_frames(2, 2, side=56)
    ws = Socket(base_url)
    ws.send("session.update", session={"max_pixels": 56 * 56, "star_size": 4, "stream_size": 4})
    ws.until("session.updated")
    for i, f in enumerate(frames):
        ws.send("input_audio_buffer.append", audio=pcm16(0.5, 300 + 50 * i), timestamp_ms=500 * i)
        ws.send("input_image_buffer.append", image=png(f), timestamp_ms=500 * i)
    ws.send("conversation.item.create", item={"type": "message", "role": "user",
                                              "content": [{"type": "input_text", "text": "What is heard?"}]})
    ws.send("response.create", response={"max_output_tokens": TOKENS})
    done = ws.until("response.done")
    ws.close()
    assert done["type"] == "response.done", done

    from omnistream.media.frame_memory import FrameMemoryConfig

    live = engine.live_session(max_pixels=56 * 56, memory=FrameMemoryConfig(star_capacity=4, stream_capacity=4))
    try:
        for i, f in enumerate(frames):
            pcm = np.frombuffer(base64.b64decode(pcm16(0.5, 300 + 50 * i)), "<i2")
            live.add_audio(pcm, 0.5 * i, 16000)
            live.add_frame(f, 0.5 * i)
        want = live.ask("What is heard?", SamplingParams(max_new_tokens=TOKENS, temperature=0.0))
    finally:
        live.close()
    assert done["response"]["output_text"] == want.text
    assert done["response"]["usage"]["input_tokens"] == want.metrics.prompt_tokens
    assert want.metrics.prompt_tokens > 60  # 2 s of sound is 50 audio tokens; the frames are 8
