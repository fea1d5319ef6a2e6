"""Pinned sessions over HTTP: create, media, chat turns with X-Session-Id (the real openai
client), fork, delete, TTL, cap, tenants; answers equal an in-process Session's."""

from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from omnistream.engine.sampling import SamplingParams
from omnistream.entrypoints.api import Engine
from omnistream.server.app import build_app
from omnistream.server.config import ServerConfig
from tests.server_util import serve

KEY_A, KEY_B = "key-a", "key-b"
SYSTEM = "You look at pictures."
GREEDY = SamplingParams(max_new_tokens=6, ignore_eos=True)


def png_bytes(seed: int, side: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}


@pytest.fixture(scope="module")
def engine():
    eng = Engine.from_pretrained("demo", engine_process=True)  # as `omnistream serve` runs it
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"# tenants: the second one\n{KEY_B}\n\n")
    app = build_app(engine, ServerConfig(api_key=KEY_A, api_keys_file=keys))  # two keys: two tenants
    with serve(app) as url:
        yield url, app


def http(server, key: str = KEY_A) -> httpx.Client:
    return httpx.Client(base_url=server[0], headers={"Authorization": f"Bearer {key}"}, timeout=60)


def oa(server, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=key, max_retries=0)


def ask(server, sid: str, content, *, key: str = KEY_A, stream: bool = False, **kw):
    """One greedy turn of 6 tokens inside session `sid` (the real openai client)."""
    client = oa(server, key)
    return client.chat.completions.create(
        model=client.models.list().data[0].id, messages=[{"role": "user", "content": content}], max_tokens=6,
        temperature=0, stream=stream, extra_headers={"X-Session-Id": sid}, extra_body={"ignore_eos": True}, **kw)


def new_session(server, key: str = KEY_A, **body) -> str:
    r = http(server, key).post("/v1/sessions", json={"system": SYSTEM, **body})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_follow_up_costs_only_its_own_tokens_and_equals_in_process(server, engine):
    sid = new_session(server)
    r = http(server).post(f"/v1/sessions/{sid}/media", json=image_part(png_bytes(1)))
    assert r.status_code == 200, r.text
    assert r.json()["pending_media"] == 1 and r.json()["turns"] == 0

    first = ask(server, sid, "What is in the picture?")
    second = ask(server, sid, [{"type": "text", "text": "And its colours?"}])
    u1, u2 = first.usage, second.usage
    # the whole first turn (prompt + answer) is served from the session's KV, block by block
    assert u2.prompt_tokens_details.cached_tokens >= (u1.prompt_tokens + u1.completion_tokens) // 16 * 16
    assert u2.prompt_tokens - u2.prompt_tokens_details.cached_tokens < 16 + 12  # a block + the new turn
    stats = http(server).get(f"/v1/sessions/{sid}").json()
    assert stats["turns"] == 2 and stats["media_items"] == 1 and stats["pending_media"] == 0
    assert stats["pinned_tokens"] > u1.prompt_tokens

    # the same conversation in-process (another tenant: nothing shared through the cache)
    ref = engine.session(system=SYSTEM, tenant="reference")
    ref.add_image(Image.open(io.BytesIO(png_bytes(1))))
    a1 = ref.ask("What is in the picture?", GREEDY)
    a2 = ref.ask("And its colours?", GREEDY)
    ref.close()
    assert first.choices[0].message.content == a1.text and second.choices[0].message.content == a2.text
    assert u2.prompt_tokens == a2.metrics.prompt_tokens


def test_fork_streamed_equals_non_streamed_then_delete(server, engine):
    sid = new_session(server)
    ask(server, sid, [image_part(png_bytes(2)), {"type": "text", "text": "Describe it."}])  # media inside the turn
    r = http(server).post(f"/v1/sessions/{sid}/fork")
    assert r.status_code == 200, r.text
    fork = r.json()
    assert fork["id"] != sid and fork["turns"] == 1 and fork["context_tokens"] > 0

    plain = ask(server, sid, "Anything else?")
    chunks = list(ask(server, fork["id"], "Anything else?", stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0

    retained = engine.stats()["kv_blocks_retained"]
    for s in (sid, fork["id"]):
        r = http(server).delete(f"/v1/sessions/{s}")
        assert r.status_code == 200 and r.json()["deleted"] is True
        assert http(server).get(f"/v1/sessions/{s}").status_code == 404
    assert engine.stats()["kv_blocks_retained"] < retained
    with pytest.raises(openai.NotFoundError):
        ask(server, sid, "Still there?")
    assert http(server).delete(f"/v1/sessions/{sid}").status_code == 404


def test_video_then_questions_and_an_empty_create(server, tmp_path):
    from omnistream.media.samples import write_sample_video

    r = http(server).post("/v1/sessions")  # no body: the defaults
    assert r.status_code == 200, r.text
    sid = r.json()["id"]
    clip = write_sample_video(tmp_path / "clip.mp4", seconds=1.0, fps=4, width=112, height=112)
    url = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    r = http(server).post(f"/v1/sessions/{sid}/media", json={"type": "video_url", "video_url": {"url": url, "fps": 2}})
    assert r.status_code == 200, r.text
    first = ask(server, sid, "What moves?")
    assert first.model_extra["metrics"]["media_tokens"] > 0
    second = ask(server, sid, "Where?")
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens // 16 * 16
    assert http(server).get(f"/v1/sessions/{sid}").json()["media_items"] == 1
    http(server).delete(f"/v1/sessions/{sid}")


def test_tenants_never_see_each_others_sessions(server):
    sid = new_session(server, KEY_A)
    b = http(server, KEY_B)
    for r in (b.get(f"/v1/sessions/{sid}"), b.post(f"/v1/sessions/{sid}/fork"), b.delete(f"/v1/sessions/{sid}"),
              b.post(f"/v1/sessions/{sid}/media", json=image_part(png_bytes(3)))):
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "session_not_found"
    with pytest.raises(openai.NotFoundError):
        ask(server, sid, "Hello?", key=KEY_B)
    assert http(server, KEY_A).get(f"/v1/sessions/{sid}").status_code == 200  # untouched
    assert http(server, "wrong").get(f"/v1/sessions/{sid}").status_code == 401
    http(server, KEY_A).delete(f"/v1/sessions/{sid}")


def test_bad_turns_are_400_and_leave_the_session_as_it_was(server):
    sid = new_session(server)
    c = http(server)
    bad = [
        c.post(f"/v1/sessions/{sid}/media", json={"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                                      + base64.b64encode(b"not an image").decode()}}),
        c.post(f"/v1/sessions/{sid}/media", json={"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}),
        c.post(f"/v1/sessions/{sid}/media", json={"type": "text", "text": "hi"}),
        c.post("/v1/sessions", json={"system": "x", "unknown": 1}),
    ]
    for r in bad:
        assert r.status_code == 400, r.text
    for r in bad[:2]:  # the body is one part: no message to name (a fresh-clone trial saw messages[0].content[0])
        error = r.json()["error"]
        assert error["param"] is None and "messages[" not in error["message"], error
    model = oa(server).models.list().data[0].id
    two = c.post("/v1/chat/completions", headers={"X-Session-Id": sid}, json={
        "model": model, "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})
    assert two.status_code == 400 and "only the new user turn" in two.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):  # a text file as the image inside the turn
        ask(server, sid, [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}},
                          {"type": "text", "text": "What is it?"}])
    stats = c.get(f"/v1/sessions/{sid}").json()
    assert stats["turns"] == 0 and stats["pending_media"] == 0 and stats["context_tokens"] == 0
    ask(server, sid, "Still fine?")
    assert c.get(f"/v1/sessions/{sid}").json()["turns"] == 1
    c.delete(f"/v1/sessions/{sid}")


def test_a_client_leaving_mid_stream_keeps_nothing_of_the_turn(server):
    sid = new_session(server)
    ask(server, sid, "First.")
    client = oa(server)
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "A long answer please."}], max_tokens=2000, temperature=0,
        stream=True, extra_headers={"X-Session-Id": sid}, extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()  # gone mid-answer: the request is aborted, the turn not committed
    deadline = time.monotonic() + 30
    while True:  # the session's turn is free again once the server noticed
        stats = http(server).get(f"/v1/sessions/{sid}").json()
        try:
            follow = ask(server, sid, "Second.")
            break
        except openai.APIError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert stats["turns"] == 1
    assert http(server).get(f"/v1/sessions/{sid}").json()["turns"] == 2
    assert follow.choices[0].finish_reason == "length"
    http(server).delete(f"/v1/sessions/{sid}")


def test_delete_mid_answer_aborts_it(server, engine):
    sid = new_session(server)
    client = oa(server)
    stream = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=[{"role": "user", "content": "Talk."}], max_tokens=3000,
        temperature=0, stream=True, extra_headers={"X-Session-Id": sid}, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    t0 = time.monotonic()
    assert http(server).delete(f"/v1/sessions/{sid}").status_code == 200  # aborts the answer, then closes
    assert time.monotonic() - t0 < 10
    with pytest.raises(openai.APIError, match="closed while it answered"):  # the stream ends with an error event
        for _ in chunks:
            pass
    assert http(server).get(f"/v1/sessions/{sid}").status_code == 404
    deadline = time.monotonic() + 10
    while engine.stats()["requests_running"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_ttl_and_cap(engine):
    app = build_app(engine, ServerConfig(session_ttl_s=0.4, max_sessions=2))
    with serve(app) as url:
        c = httpx.Client(base_url=url, timeout=60)
        ids = [c.post("/v1/sessions", json={}).json()["id"] for _ in range(2)]
        over = c.post("/v1/sessions", json={})
        assert over.status_code == 429
        assert "maximum of 2 open sessions" in over.json()["error"]["message"]
        registry = app.state.omni.extras["sessions"]
        assert registry.counts() == {"session": 2, "live": 0}
        engine_sessions = engine.stats()["sessions"]
        # a session in use is kept alive by its use; idle ones are closed by the sweeper
        keep = ids[0]
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline:
            assert c.get(f"/v1/sessions/{keep}").status_code == 200
            time.sleep(0.1)
        time.sleep(1.0)
        assert all(c.get(f"/v1/sessions/{i}").status_code == 404 for i in ids)
        assert registry.counts() == {"session": 0, "live": 0}
        assert engine.stats()["sessions"] == engine_sessions - 2  # closed in the engine too
        assert c.post("/v1/sessions", json={}).status_code == 200  # room again
    assert registry.counts() == {"session": 0, "live": 0}  # shutdown closed the last one


def test_media_for_a_session_closed_meanwhile_is_a_404(server):
    """A DELETE that lands while the media of an add are decoded: 404 session_not_found, not a
    400 (found by a fresh-clone trial)."""
    url, app = server
    sid = new_session(server)
    [entry] = [e for e in app.state.omni.extras["sessions"].entries("session") if e.session.id == sid or e.id == sid]
    entry.session.close()  # as the DELETE would, between the lookup and the add
    r = http(server).post(f"/v1/sessions/{sid}/media", json=image_part(png_bytes(5)))
    assert r.status_code == 404, r.text
