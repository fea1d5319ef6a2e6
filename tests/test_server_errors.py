"""Bad requests get the right 4xx OpenAI error object and the server keeps serving; clients
that leave abort their requests (KV freed); overload is a 503; API keys and tenants.

One server with an API key, small limits and an engine that runs one sequence at a time (so a
second long request waits and a third one overflows the queue)."""

from __future__ import annotations

import base64
import json
import os
import random
import resource
import struct
import time
import zlib

import httpx
import openai
import pytest
from fastapi import WebSocket
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from omnistream import Engine
from omnistream.media.samples import write_image, write_sample_video
from omnistream.server.app import build_app
from omnistream.server.auth import accepted_subprotocol, tenant_for, tenant_salt
from omnistream.server.config import ServerConfig
from tests.server_util import serve

MODEL = "demo-model"
KEY = "sekrit-key"
LONG = {"max_tokens": 3000, "temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("files")
    root = base / "allowed"
    root.mkdir()
    write_image(root / "ok.png", width=64, height=48)
    write_image(base / "outside.png", width=64, height=48)
    os.symlink(base / "outside.png", root / "link.png")
    os.symlink(root / "loop-b", root / "loop-a")
    os.symlink(root / "loop-a", root / "loop-b")
    (root / "notes.txt").write_text("just some text, not an image\n" * 10)
    video = write_sample_video(root / "clip.mp4", seconds=1.4, fps=10, width=112, height=112)
    write_sample_video(root / "long.mp4", seconds=2, fps=4, width=112, height=112)
    return {"base": base, "root": root, "video": video}


@pytest.fixture(scope="module")
def engine():
    e = Engine.from_pretrained("demo", max_num_seqs=1, engine_process=True)  # as `omnistream serve` runs it
    yield e
    e.close()


@pytest.fixture(scope="module")
def base_url(engine, files):
    config = ServerConfig(api_key=KEY, allowed_media_path=files["root"], max_body_bytes=1 << 20,
                          max_image_pixels=200 * 200, max_video_frames=6, max_video_seconds=1.5, max_queued_requests=1)
    app = build_app(engine, config)
    app.add_api_websocket_route("/test/ws", _tenant_echo)  # any WebSocket route is behind the key
    with serve(app) as url:
        yield url


async def _tenant_echo(ws: WebSocket) -> None:
    await ws.accept(subprotocol=accepted_subprotocol(ws))
    await ws.send_json({"tenant": tenant_for(ws)})
    await ws.close()


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key=KEY, max_retries=0)


def ask(client, content, **kwargs):
    kwargs.setdefault("max_tokens", 2)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kwargs)


def assert_serving(client) -> None:
    assert ask(client, "still there?").choices[0].message.content is not None


def rejected(client, status: int, content=None, **kwargs) -> dict:
    """The OpenAI error object of a request that must fail with `status`."""
    with pytest.raises(openai.APIStatusError) as info:
        ask(client, content if content is not None else "hi", **kwargs)
    assert info.value.status_code == status, info.value.message
    body = info.value.body
    assert set(body) == {"message", "type", "param", "code"}, body
    assert_serving(client)
    return body


def image_part(url: str) -> list:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is it?"}]


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def png_header(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR (RGB, 8 bit) + a tiny IDAT + IEND: the header claims
    width x height pixels, the file is 70 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def wait_idle(engine, timeout_s: float = 10.0) -> dict:
    """Engine stats once nothing runs or waits (fails after timeout_s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = engine.stats()
        if s["requests_running"] == 0 and s["requests_waiting"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"]:
            return s
        assert time.monotonic() < deadline, s
        time.sleep(0.05)


# ------------------------------------------------------------------------------ requests
def test_invalid_json_and_non_object_bodies(client, base_url):
    url, auth = base_url + "/v1/chat/completions", {"authorization": f"Bearer {KEY}"}
    r = httpx.post(url, content=b'{"model": "demo-model", "messages": [', headers={**auth, "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url, content=b"[1, 2]", headers={**auth, "content-type": "application/json"})
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    assert_serving(client)


def test_unknown_and_invalid_fields(client):
    body = rejected(client, 400, extra_body={"frobnicate": 1})
    assert body["param"] == "frobnicate" and "frobnicate" in body["message"]
    assert "tools" in rejected(client, 400, tools=[{"type": "function", "function": {"name": "f"}}])["message"]
    rejected(client, 400, temperature=3)
    rejected(client, 400, n=100)
    rejected(client, 400, top_logprobs=2)  # without logprobs
    rejected(client, 400, frequency_penalty=0.5)
    assert ask(client, "hi", frequency_penalty=0, presence_penalty=0, user="u1", store=False,
               metadata={"k": "v"}).choices  # harmless fields are accepted
    body = rejected(client, 400, content=[{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}])
    assert body["param"] == "messages[0].content[0]" and body["code"] == "audio_not_supported"  # a VL model
    body = rejected(client, 400, content=[{"type": "input_sound", "input_sound": {}}])
    assert body["param"] == "messages[0].content[0]" and "unknown 'type' 'input_sound'" in body["message"], body
    # one problem, said once, in the request's own terms: pydantic named every branch of the
    # content union (`messages.0.content.str: Input should be a valid string; messages.0.content.
    # list[tagged-union[TextPart,...]].0.image_url.image_url: Field required`, a fresh-clone trial)
    body = rejected(client, 400, content=[{"type": "image_url"}])
    assert body["message"] == "messages[0].content[0].image_url: Field required", body
    assert body["param"] == "messages[0].content[0].image_url"
    body = rejected(client, 400, content=5)
    assert body["message"] == "messages[0].content: Input should be a valid string or a valid array", body


def test_unknown_model_route_and_session(client, base_url):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"
    r = httpx.get(base_url + "/v1/nothing", headers={"authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    body = rejected(client, 404, extra_headers={"X-Session-Id": "s-doesnotexist"})
    assert "s-doesnotexist" in body["message"]


def test_context_length_exceeded(client):
    body = rejected(client, 400, max_tokens=10_000_000)
    assert body["code"] == "context_length_exceeded"
    # named as sent (it said max_new_tokens, param null: a fresh-clone trial)
    assert body["param"] == "max_tokens" and body["message"].startswith("max_tokens 10000000 + the prompt's"), body
    body = rejected(client, 400, max_completion_tokens=10_000_000)
    assert body["param"] == "max_completion_tokens" and body["code"] == "context_length_exceeded"


def test_small_mistakes_in_messages_are_named(client):
    """Found by a fresh-clone trial: an empty url read as a local path (403 local media files are
    disabled), a user message without content was an empty turn (200), a data URL of text said
    PIL's `cannot identify image file the data`."""
    body = rejected(client, 400, content=[{"type": "image_url", "image_url": {"url": ""}}])
    assert body["code"] == "invalid_url" and "image_url is empty" in body["message"], body
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": None}], max_tokens=2)
    assert "a user message needs a content" in info.value.body["message"], info.value.body
    text = "data:image/png;base64," + base64.b64encode(b"hello, not an image").decode()
    body = rejected(client, 400, content=[{"type": "image_url", "image_url": {"url": text}}])
    assert body["code"] == "invalid_media" and body["message"].endswith("(PNG, JPEG, WEBP, GIF, BMP, TIFF)"), body


# --------------------------------------------------------------------------------- media
def test_bad_base64_and_non_image_bytes(client, files):
    body = rejected(client, 400, image_part("data:image/png;base64,@@not*base64@@"))
    assert body["code"] == "invalid_base64" and body["param"] == "messages[0].content[0]"
    rejected(client, 400, image_part("data:image/png,rawbytes"))
    body = rejected(client, 400, image_part(data_url((files["root"] / "notes.txt").read_bytes())))
    assert body["code"] == "invalid_media" and "not an image" in body["message"]
    assert rejected(client, 400, image_part("notes.txt"))["code"] == "invalid_media"  # a local text file
    body = rejected(client, 400, image_part("data:image/jpeg;base64,AAAA"))  # PIL names its buffer's repr
    assert body["code"] == "invalid_media" and " object at 0x" not in body["message"], body["message"]


def test_huge_png_header_refused_without_decoding(client):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; the server runs in this process
    t0 = time.perf_counter()
    body = rejected(client, 413, image_part(data_url(png_header(50_000, 50_000))))
    assert time.perf_counter() - t0 < 5.0
    assert body["code"] == "payload_too_large" and "too large" in body["message"]
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200 * 1024  # 7.5 GB if decoded


def test_image_pixel_limit_from_the_header(client, files):
    """Over the server's own limit (200x200 here), below PIL's decompression-bomb threshold."""
    write_image(files["root"] / "big.png", width=320, height=240)
    body = rejected(client, 413, image_part("big.png"))
    assert "320x240" in body["message"] and str(200 * 200) in body["message"]
    assert ask(client, image_part("ok.png")).choices


def test_truncated_and_oversampled_video(client, files):
    data = files["video"].read_bytes()
    part = {"type": "video_url", "video_url": {"url": data_url(data[: len(data) * 3 // 10], "video/mp4"), "fps": 2}}
    body = rejected(client, 400, [part, {"type": "text", "text": "what?"}])
    assert body["code"] == "invalid_media" and "/tmp" not in body["message"]  # no server-side paths
    over = {"type": "video_url", "video_url": {"url": "clip.mp4", "fps": 8}}  # 10 frames > 6
    assert "10 frames" in rejected(client, 413, [over, {"type": "text", "text": "what?"}])["message"]
    long = {"type": "video_url", "video_url": {"url": "long.mp4", "fps": 1}}  # 2 s > 1.5 s
    assert "2.0 s exceeds" in rejected(client, 413, [long, {"type": "text", "text": "what?"}])["message"]
    ok = {"type": "video_url", "video_url": {"url": "clip.mp4", "fps": 2, "max_pixels": 112 * 112}}
    assert ask(client, [ok, {"type": "text", "text": "what?"}]).choices


def test_paths_outside_the_allowed_root(client, files):
    for src in ("../outside.png", str(files["base"] / "outside.png"), "link.png", "/etc/passwd",
                f"file://{files['root']}/%2e%2e/outside.png"):
        body = rejected(client, 403, image_part(src))
        assert body["code"] == "media_path_forbidden" and "outside the allowed media path" in body["message"], src
    assert "not found" in rejected(client, 400, image_part("missing.png"))["message"]
    for src in ("loop-a", "bad\x00name.png", "x" * 5000):  # symlink loop, NUL byte, name too long
        rejected(client, 400, image_part(src))
    assert rejected(client, 400, image_part("https://example.com/cat.png"))["code"] == "remote_media_disabled"


def test_corrupted_media_is_never_a_server_error(client, base_url, files):
    """Random byte flips and cuts of a valid PNG and MP4: each answer is a 200 or a 4xx."""
    rng = random.Random(0)
    cases = []
    for name, mime in (("ok.png", "image/png"), ("clip.mp4", "video/mp4")):
        good = (files["root"] / name).read_bytes()
        for i in range(12):
            data = bytearray(good)
            if i % 3 == 0:
                data = data[: rng.randrange(8, len(data))]
            for _ in range(rng.choice([1, 8, 64])):
                data[rng.randrange(len(data))] = rng.randrange(256)
            kind = "image_url" if mime.startswith("image") else "video_url"
            cases.append([{"type": kind, kind: {"url": data_url(bytes(data), mime)}}, {"type": "text", "text": "?"}])
    cases.append("a literal <|video_pad|> in the text")
    headers = {"authorization": f"Bearer {KEY}"}
    for content in cases:
        r = httpx.post(base_url + "/v1/chat/completions", headers=headers, timeout=60,
                       json={"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 1})
        assert r.status_code in (200, 400, 413), r.text
    assert_serving(client)


def test_body_over_the_limit(client, base_url):
    url, headers = base_url + "/v1/chat/completions", {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    big = b'{"model": "demo-model", "messages": [{"role": "user", "content": "' + b"x" * (2 << 20) + b'"}]}'
    r = httpx.post(url, content=big, headers=headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    def chunked():  # no content-length: counted as it arrives
        for i in range(0, len(big), 64 << 10):
            yield big[i : i + 64 << 10]

    r = httpx.post(url, content=chunked(), headers=headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    # without a valid key the size is nobody's business: 401 before the body is read (a
    # fresh-clone trial got 413 here)
    r = httpx.post(url, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert_serving(client)


# ---------------------------------------------------------------------------------- auth
def test_api_key_required_except_health(base_url, client):
    for key in (None, "wrong-key"):
        headers = {"authorization": f"Bearer {key}"} if key else {}
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/metrics"),
                             ("GET", "/v1/nothing")):
            r = httpx.request(method, base_url + path, headers=headers, json={})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (key, path)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base_url + "/v1", api_key="wrong-key", max_retries=0).models.list()
    assert httpx.get(base_url + "/health").json()["engine_alive"] is True
    assert_serving(client)


def test_websocket_key_by_header_query_or_subprotocol(base_url):
    ws_url = base_url.replace("http://", "ws://") + "/test/ws"
    for kwargs in ({}, {"additional_headers": {"Authorization": "Bearer wrong-key"}}, {"subprotocols": ["realtime"]}):
        with pytest.raises(InvalidStatus) as info:
            connect(ws_url, **kwargs)
        assert info.value.response.status_code == 401
    for url, kwargs in ((ws_url, {"additional_headers": {"Authorization": f"Bearer {KEY}"}}),
                        (ws_url + f"?api_key={KEY}", {}),
                        (ws_url, {"subprotocols": ["realtime", f"openai-insecure-api-key.{KEY}", "openai-beta.realtime-v1"]})):
        with connect(url, **kwargs) as ws:
            assert json.loads(ws.recv()) == {"tenant": tenant_salt(KEY)}
            assert ws.subprotocol == ("realtime" if "subprotocols" in kwargs else None)  # never the key


def test_tenants_do_not_share_prefix_cache(engine, client, files):
    """Another key on the same engine: the same prompt finds none of the first tenant's KV."""
    prompt = "A tenant-specific prompt that is long enough to fill a few KV blocks of sixteen tokens."
    ask(client, prompt)
    assert ask(client, prompt).usage.prompt_tokens_details.cached_tokens > 0
    with serve(build_app(engine, ServerConfig(api_key="other-key", media_decode_timeout_s=0.001))) as url:
        other = openai.OpenAI(base_url=url + "/v1", api_key="other-key", max_retries=0)
        assert ask(other, prompt).usage.prompt_tokens_details.cached_tokens == 0
        assert ask(other, prompt).usage.prompt_tokens_details.cached_tokens > 0
        # its own metrics registry: the first server's 401s are not counted here
        text = httpx.get(url + "/metrics", headers={"authorization": "Bearer other-key"}).text
        assert 'omnistream_http_requests_total{status="200"}' in text and 'status="401"' not in text
        # a decode over the (tiny) time limit: a 400 naming the limit, the server goes on
        video = {"type": "video_url", "video_url": {"url": data_url(files["video"].read_bytes(), "video/mp4")}}
        body = rejected(other, 400, [video, {"type": "text", "text": "what?"}])
        assert body["code"] == "media_decode_timeout"


# ----------------------------------------------------------------------- leaving, overload
def test_client_disconnect_mid_stream_frees_kv(engine, base_url, client):
    headers = {"authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go on forever"}], "stream": True,
            "max_tokens": 3000, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", base_url + "/v1/chat/completions", json=body, headers=headers) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any('"content"' in x for x in got)
        assert engine.stats()["requests_running"] == 1
    wait_idle(engine)
    assert_serving(client)


def test_client_disconnect_without_streaming_aborts(engine, base_url, client):
    headers = {"authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a long answer please"}], "max_tokens": 3000,
            "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base_url + "/v1/chat/completions", json=body, headers=headers, timeout=1.0)
    wait_idle(engine)
    assert_serving(client)


def test_overloaded_queue_is_a_503(engine, base_url, client):
    """One sequence runs at a time: a second long request waits; with one waiting (the limit),
    a third is refused at once with 503 and Retry-After."""
    headers = {"authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "busy"}], "stream": True,
            "max_tokens": 3000, "ignore_eos": True, "temperature": 0}
    with httpx.Client(headers=headers, timeout=30) as http:
        with http.stream("POST", base_url + "/v1/chat/completions", json=body) as first:
            first_lines = first.iter_lines()  # kept: a dropped line iterator closes the connection
            next(first_lines)
            with http.stream("POST", base_url + "/v1/chat/completions", json=body) as second:
                second_lines = second.iter_lines()
                next(second_lines)  # its role chunk: it is queued
                deadline = time.monotonic() + 10
                while engine.stats()["requests_waiting"] < 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                r = http.post(base_url + "/v1/chat/completions", json={**body, "stream": False})
                assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
                assert r.headers["retry-after"] == "1"
                assert '"content"' in next(line for line in first_lines if line)  # the first one still runs
    wait_idle(engine)
    assert_serving(client)


def test_api_keys_file_is_checked_at_startup(tmp_path):
    """Every line's key is accepted (comments and blank lines skipped); a missing, empty or
    malformed file is refused when the server is configured, naming the file and the line."""
    from omnistream.errors import ConfigError

    good = tmp_path / "keys.txt"
    good.write_bytes("\ufeffalpha\r\n# beta\n\n gamma#ops \n".encode())  # a BOM, CRLF, '#' inside a key
    assert ServerConfig(api_key="k", api_keys_file=good).api_keys() == ["k", "alpha", "gamma#ops"]
    assert ServerConfig(api_keys_file=good).api_keys() == ["alpha", "gamma#ops"]
    (tmp_path / "empty.txt").write_text("# nobody\n")
    (tmp_path / "bad.txt").write_text("ok\ntwo words\n")
    for name, message in (("missing.txt", "No such file"), ("empty.txt", "no keys"), ("bad.txt", "line 2")):
        with pytest.raises(ConfigError, match=message):
            ServerConfig(api_keys_file=tmp_path / name)
    for key in ("", " ", "a b"):  # `--api-key "$KEY"` with KEY unset must not start an open server
        with pytest.raises(ConfigError, match="api_key"):
            ServerConfig(api_key=key)


def test_nan_sampling_values_are_named_as_not_finite(client, base_url):
    """NaN is valid JSON to Python's parser; it was refused as "less than or equal to 2"."""
    raw = '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}' % MODEL
    r = httpx.post(base_url + "/v1/chat/completions", content=raw, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 400 and "finite" in r.json()["error"]["message"], r.text
    assert_serving(client)
