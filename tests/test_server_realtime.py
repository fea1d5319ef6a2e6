"""/v1/realtime over a real WebSocket client (websocket-client): frames, questions, streamed
deltas, response.done metrics; answers equal an in-process LiveSession's for the same frames;
frames keep arriving while an answer streams; bad events get an error and the socket goes on;
a socket that leaves mid-answer frees everything."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import websocket
from PIL import Image

from omnistream.engine.sampling import SamplingParams
from omnistream.entrypoints.api import Engine
from omnistream.media.frame_memory import FrameMemoryConfig
from omnistream.server.app import build_app
from omnistream.server.config import ServerConfig
from tests.server_util import serve

KEY = "rt-key"
SIZE = 56 * 56  # frames resized to 56x56: 4 LLM tokens per temporal patch
SETTINGS = {"max_pixels": SIZE, "star_size": 4, "stream_size": 4}


def scene_frames(n_scenes: int, per_scene: int, seed: int = 0, side: int = 64) -> list[np.ndarray]:
    """Distinct textures with slight motion inside a scene: the frame memory keeps and evicts."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_scenes):
        base = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
        out += [np.roll(base, i, axis=1) for i in range(per_scene)]
    return out


def png(frame: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, "PNG")  # lossless: the server decodes exactly `frame`
    return base64.b64encode(buf.getvalue()).decode()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no pixel data behind it)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    iend = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk)) + iend


class Client:
    def __init__(self, url: str, key: str | None = KEY, query: str = "") -> None:
        header = [f"Authorization: Bearer {key}"] if key and not query else []
        self.ws = websocket.create_connection(url.replace("http", "ws") + "/v1/realtime" + query, header=header, timeout=60)
        self.n = 0

    def send(self, type_: str, **fields) -> str:
        self.n += 1
        event_id = f"c{self.n}"
        self.ws.send(json.dumps({"type": type_, "event_id": event_id, **fields}))
        return event_id

    def recv(self) -> dict:
        return json.loads(self.ws.recv())

    def until(self, type_: str) -> tuple[list[dict], dict]:
        seen = []
        while True:
            ev = self.recv()
            if ev["type"] == type_:
                return seen, ev
            seen.append(ev)

    def frames(self, frames: list[np.ndarray], t0_ms: int = 0, step_ms: int = 500) -> None:
        for i, f in enumerate(frames):
            self.send("input_image_buffer.append", image=png(f), timestamp_ms=t0_ms + i * step_ms)

    def ask(self, text: str, **response) -> str:
        self.send("conversation.item.create", item={"type": "message", "role": "user",
                                                    "content": [{"type": "input_text", "text": text}]})
        return self.send("response.create", response=response)

    def answer(self) -> tuple[str, dict]:
        """(concatenated deltas, response.done's response) of the next answer."""
        seen, done = self.until("response.done")
        assert not [e for e in seen if e["type"] == "error"], seen
        deltas = [e["delta"] for e in seen if e["type"] == "response.output_text.delta"]
        assert all(e["response_id"] == done["response"]["id"] for e in seen if e["type"] == "response.output_text.delta")
        return "".join(deltas), done["response"]

    def open(self, **settings) -> dict:
        assert self.recv()["type"] == "session.created"
        self.send("session.update", session=settings)
        return self.until("session.updated")[1]["session"]

    def close_code(self) -> int:
        """The code of the close frame the server sends next."""
        opcode, data = self.ws.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE, (opcode, data)
        return struct.unpack(">H", data[:2])[0]

    def close(self) -> None:
        self.ws.close()


@pytest.fixture(scope="module")
def engine():
    eng = Engine.from_pretrained("demo", engine_process=True)  # as `omnistream serve` runs it
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine):
    app = build_app(engine, ServerConfig(api_key=KEY))
    with serve(app) as url:
        yield url, app


def live_entry(app):
    [entry] = app.state.omni.extras["sessions"].entries("live")
    return entry


def in_process(engine, frames_per_question, questions, policy="exact", max_new=8):
    live = engine.live_session(tenant="reference", memory=FrameMemoryConfig(star_capacity=4, stream_capacity=4),
                               max_pixels=SIZE, policy=policy)
    out, t = [], 0
    try:
        for frames, q in zip(frames_per_question, questions):
            live.add_frames(frames, [(t + i) * 0.5 for i in range(len(frames))])
            t += len(frames)
            out.append(live.ask(q, SamplingParams(max_new_tokens=max_new)))
    finally:
        live.close()
    return out


@pytest.mark.parametrize("policy", ["exact", "fast"])
def test_two_questions_equal_in_process_with_metrics(server, engine, policy):
    url, app = server
    frames = scene_frames(3, 4, seed=1)
    c = Client(url)
    assert c.open(**SETTINGS, policy=policy)["policy"] == policy
    c.frames(frames[:8])
    c.ask("What is happening?", max_output_tokens=8)
    text1, done1 = c.answer()
    c.frames(frames[8:], t0_ms=8 * 500)
    c.ask("And now?", max_output_tokens=8, temperature=0)
    text2, done2 = c.answer()
    c.close()

    ref1, ref2 = in_process(engine, [frames[:8], frames[8:]], ["What is happening?", "And now?"], policy)
    if policy == "exact":  # greedy over the socket == in-process (`fast` depends on when its KV edits ran)
        assert (text1, text2) == (ref1.text, ref2.text)
    for text, done, ref, n in ((text1, done1, ref1, 8), (text2, done2, ref2, 12)):
        assert done["output_text"] == text == done["output"][0]["content"][0]["text"]
        assert done["status"] == ("incomplete" if ref.finish_reason == "length" else "completed")
        m = done["metrics"]
        assert m["frames_received"] == n and m["policy"] == policy
        assert m["ttft_ms"] > 0 and m["total_ms"] >= m["ttft_ms"] and m["encoding_ms"] >= 0
        assert m["prefill_ms"] >= 0 and m["generation_ms"] >= 0 and m["frames_encoded"] >= 0
        # (frames_encoded differs: the in-process run finds the patches in the shared encoder cache)
        for key in ("frames_in_context", "visual_tokens", "kv_cache_length", "star_size", "stream_size",
                    "compression_ratio"):
            assert m[key] == getattr(ref.live, key), key
        if policy == "exact":
            assert done["usage"]["output_tokens"] == len(ref.token_ids)
            assert done["usage"]["input_tokens"] == ref.metrics.prompt_tokens
    assert done2["metrics"]["compression_ratio"] > 1  # 12 frames into a memory of 4 + 4


def test_live_ask_stream_equals_ask_in_process(engine):
    """LiveSession.ask_stream (what the socket streams): deltas add up to ask()'s answer, the
    turn joins the history; an abandoned stream keeps nothing and frees the session."""
    frames = scene_frames(2, 4, seed=6)
    answers = []
    for streaming in (False, True):
        live = engine.live_session(tenant=f"stream-{streaming}", memory=FrameMemoryConfig(4, 4), max_pixels=SIZE)
        live.add_frames(frames, [i * 0.5 for i in range(len(frames))])
        greedy = SamplingParams(max_new_tokens=8)
        if streaming:
            gen = live.ask_stream("What is it?", greedy)
            deltas = []
            while True:
                try:
                    deltas.append(next(gen).text)
                except StopIteration as stop:
                    result = stop.value  # the RequestOutput, with its LiveMetrics
                    break
            assert "".join(deltas) == result.text and result.live.frames_in_context > 0
            abandoned = live.ask_stream("And then?", SamplingParams(max_new_tokens=500))
            next(abandoned)
            abandoned.close()  # aborted: nothing joins the history, the session is free again
            assert live.turns == 1
            answers.append([result.text, live.ask("Again?", greedy).text])
        else:
            answers.append([live.ask("What is it?", greedy).text, live.ask("Again?", greedy).text])
        live.close()
    assert answers[0] == answers[1]


def test_frames_keep_arriving_while_an_answer_streams(server):
    url, app = server
    frames = scene_frames(4, 4, seed=2)
    c = Client(url)
    c.open(**SETTINGS)
    c.frames(frames[:4])
    c.ask("Describe everything in detail.", max_output_tokens=300)
    assert c.until("response.created")[1]["response"]["status"] == "in_progress"
    first_delta = c.until("response.output_text.delta")[1]
    entry = live_entry(app)
    c.frames(frames[4:], t0_ms=4 * 500)  # 12 more frames while the answer streams
    deadline = time.monotonic() + 30
    while entry.session.memory.stats().frames_added < 16:  # ingested by the live session's worker
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert entry.busy == 1  # ... and the answer was still streaming then
    text, done = c.answer()
    assert done["status"] == "incomplete" and done["usage"]["output_tokens"] == 300
    assert first_delta["delta"] + text == done["output_text"]
    assert done["metrics"]["frames_in_context"] <= 4  # the answer saw the frames sent before it only
    c.ask("And now?", max_output_tokens=4)
    _, later = c.answer()
    assert later["metrics"]["frames_received"] == 16 and later["metrics"]["frames_in_context"] > 4
    c.close()


def test_bad_events_get_an_error_and_the_session_goes_on(server):
    url, app = server
    c = Client(url)
    c.open(**SETTINGS)
    c.send("session.update", session={"min_pixels": 2 * SIZE})  # above max_pixels: refused, settings kept
    ev = c.recv()
    assert ev["type"] == "error" and ev["error"]["code"] == "invalid_value", ev
    c.send("session.update", session={"instructions": "Watch closely."})
    assert c.until("session.updated")[1]["session"]["instructions"] == "Watch closely."
    assert live_entry(app).session.max_pixels == SIZE and live_entry(app).session.messages[0]["content"] == "Watch closely."
    frames = scene_frames(2, 3, seed=3)
    c.frames(frames[:2], t0_ms=1000)
    text = base64.b64encode(b"hello, I am not an image").decode()
    cases = [
        (lambda: c.ws.send("garbage {"), "invalid_json"),
        (lambda: c.ws.send("[1, 2]"), "invalid_event"),
        (lambda: c.ws.send_binary(b"\x00\x01"), "invalid_event"),
        (lambda: c.send("no.such.event"), "unknown_event"),
        (lambda: c.send("input_image_buffer.append", image="@@not base64@@", timestamp_ms=2000), "invalid_base64"),
        (lambda: c.send("input_image_buffer.append", image=text, timestamp_ms=2000), "invalid_image"),
        (lambda: c.send("input_image_buffer.append", image=png(frames[2])[:201], timestamp_ms=2000), "invalid_base64"),  # cut mid-quad
        (lambda: c.send("input_image_buffer.append", image=base64.b64encode(base64.b64decode(png(frames[2]))[:300]).decode(),
                        timestamp_ms=2000), "invalid_image"),  # a truncated PNG
        (lambda: c.send("input_image_buffer.append", image=base64.b64encode(png_header(50_000, 50_000)).decode(),
                        timestamp_ms=2000), "payload_too_large"),
        (lambda: c.send("input_image_buffer.append", image=base64.b64encode(png_header(9000, 9000)).decode(),
                        timestamp_ms=2000), "payload_too_large"),  # over ServerConfig.max_image_pixels only
        (lambda: c.send("input_image_buffer.append", image=png(frames[2]), timestamp_ms=10), "invalid_timestamp"),
        (lambda: c.send("input_image_buffer.append", timestamp_ms=3000), "missing_image"),
        (lambda: c.send("session.update", session={"star_size": 2, "colour": "red"}), "invalid_event"),
        (lambda: c.send("session.update", session={"star_size": 2}), "session_in_use"),
        (lambda: c.send("response.create", response={}), "no_question"),
        (lambda: c.send("conversation.item.create", item={"type": "message", "role": "assistant",
                                                          "content": [{"type": "input_text", "text": "x"}]}),
         "invalid_event"),
        (lambda: c.send("response.create", response={"max_output_tokens": 0}), "invalid_event"),
        (lambda: c.send("response.cancel"), "response_not_found"),
    ]
    for send, code in cases:
        event_id = send()
        ev = c.recv()
        assert ev["type"] == "error", (code, ev)
        assert ev["error"]["code"] == code, (code, ev)
        assert ev["error"]["message"]
        if isinstance(event_id, str) and event_id.startswith("c"):
            assert ev["error"]["event_id"] == event_id
    # a validation error names the field at fault in `param` (it was null: a fresh-clone trial)
    c.send("response.create", response={"max_output_tokens": 0})
    ev = c.recv()
    assert ev["error"]["param"] == "max_output_tokens" and ev["error"]["message"].startswith("max_output_tokens: "), ev
    c.frames(frames[2:], t0_ms=3000)  # timestamps after every refused one
    first = c.ask("What now?", max_output_tokens=200)
    c.ask("Too many?")  # over max_live_questions_in_flight (1)
    seen, err = c.until("error")
    assert err["error"]["code"] == "too_many_questions" and err["error"]["event_id"] != first
    text_, done = c.answer()
    assert done["status"] == "incomplete" and done["metrics"]["frames_received"] == 6  # the refused ones not counted
    c.close()


def test_cancel_ends_the_answer_and_keeps_nothing(server):
    url, app = server
    c = Client(url)
    c.open(**SETTINGS)
    c.frames(scene_frames(1, 4, seed=4))
    c.ask("Talk for a long time.", max_output_tokens=2000)
    c.until("response.output_text.delta")
    c.send("response.cancel")
    _, done = c.until("response.done")
    assert done["response"]["status"] == "cancelled"
    assert live_entry(app).session.turns == 0  # the cancelled answer joined no history
    # cancelled at once (before it starts, or before its first token): the same fields
    c.ask("Never mind.", max_output_tokens=2000)
    c.send("response.cancel")
    _, done = c.until("response.done")
    r = done["response"]
    assert r["status"] == "cancelled" and {"usage", "metrics", "finish_reason"} <= set(r), r
    assert r["metrics"]["frames_received"] >= 1 and "ttft_ms" in r["metrics"]
    assert live_entry(app).session.turns == 0
    c.ask("Short?", max_output_tokens=3)
    _, ok = c.answer()
    assert ok["status"] == "incomplete" and live_entry(app).session.turns == 1
    c.close()


def _quiet(engine, app, before: dict | None = None) -> dict:
    """Engine stats once no live session, live worker thread or request is left (and, given
    `before`, the free KV blocks are back to it)."""
    deadline = time.monotonic() + 30
    while True:
        # the registry first: a live session leaves it only once closed, so stats taken after
        # an empty registry include the release of its KV
        open_live = app.state.omni.extras["sessions"].entries("live")
        live_threads = [t for t in threading.enumerate() if t.name.startswith("live-")]
        stats = engine.stats()
        if (not open_live and not live_threads and stats["requests_running"] == 0
                and (before is None or stats["kv_blocks_free"] == before["kv_blocks_free"])):
            return stats
        assert time.monotonic() < deadline, (stats, live_threads)
        time.sleep(0.05)


def test_disconnect_mid_answer_frees_the_session(server, engine):
    url, app = server
    before = _quiet(engine, app)  # the sockets of earlier tests are closed server-side too
    for abrupt in (False, True):
        c = Client(url)
        c.open(**SETTINGS)
        c.frames(scene_frames(2, 4, seed=5))
        c.ask("Talk for a long time.", max_output_tokens=2000)
        c.until("response.output_text.delta")
        assert engine.stats()["requests_running"] == 1
        if abrupt:
            c.ws.sock.shutdown(2)  # the TCP connection drops, no close frame
            c.ws.sock.close()
        else:
            c.close()
        after = _quiet(engine, app, before)  # answer aborted, KV freed, worker thread stopped
        assert after["kv_blocks_retained"] == before["kv_blocks_retained"]
        assert after["kv_blocks_owned"] == before["kv_blocks_owned"]
        assert after["sessions"] == before["sessions"]
    assert app.state.omni.extras["sessions"].counts()["live"] == 0


def test_docs_list_every_event_and_error_code():
    import re

    from omnistream.server import realtime, realtime_events

    doc = (Path(__file__).resolve().parent.parent / "docs" / "realtime.md").read_text()
    source = Path(realtime.__file__).read_text() + Path(realtime_events.__file__).read_text()
    server_events = set(re.findall(r'"type": "([a-z_]+(?:\.[a-z_]+)+|error)"', source))
    assert {"session.created", "response.done", "response.output_text.delta", "error"} <= server_events
    names = set(realtime.RealtimeConnection._handlers) | server_events | set(realtime_events.ERROR_CODES)
    assert not sorted(n for n in names if f"`{n}`" not in doc), "missing from docs/realtime.md"


def test_auth_on_the_socket(server):
    url, _ = server
    with pytest.raises(websocket.WebSocketBadStatusException) as e:
        Client(url, key="wrong")
    assert e.value.status_code == 401
    with pytest.raises(websocket.WebSocketBadStatusException):
        Client(url, key=None)
    c = Client(url, query=f"?api_key={KEY}")  # what a browser does
    assert c.recv()["type"] == "session.created"
    c.close()
    c = Client(url, query=f"?api_key={KEY}&model=gpt-4o")
    ev = c.recv()
    assert ev["type"] == "error" and ev["error"]["code"] == "model_not_found"
    assert c.close_code() == 1008


def test_cap_and_ttl(engine):
    app = build_app(engine, ServerConfig(max_sessions=1, session_ttl_s=0.5))
    with serve(app) as url:
        a = Client(url, key=None)
        assert a.recv()["type"] == "session.created"
        b = Client(url, key=None)
        ev = b.recv()
        assert ev["type"] == "error" and ev["error"]["code"] == "too_many_sessions"
        assert b.close_code() == 1013  # try again later
        # a idles past its TTL: the server says so and closes it, freeing the slot
        ev = a.recv()
        assert ev["type"] == "error" and ev["error"]["code"] == "session_expired"
        assert a.close_code() == 1001  # going away
        deadline = time.monotonic() + 10
        while app.state.omni.extras["sessions"].counts()["live"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        c = Client(url, key=None)
        assert c.recv()["type"] == "session.created"
        c.close()


def test_response_sampling_takes_the_server_defaults():
    """A live answer's unset sampling fields take `omnistream serve`'s defaults (as chat
    completions do); set ones win; without defaults it is greedy."""
    from omnistream.engine.sampling import SamplingParams
    from omnistream.server.realtime_events import DEFAULT_MAX_OUTPUT_TOKENS, ResponseFields, response_sampling

    defaults = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, seed=5)
    s = response_sampling(ResponseFields(), defaults)
    assert (s.temperature, s.top_p, s.top_k, s.seed, s.max_new_tokens) == (0.7, 0.9, 20, 5, DEFAULT_MAX_OUTPUT_TOKENS)
    s = response_sampling(ResponseFields(temperature=0, top_p=0.5, seed=1, max_output_tokens=3), defaults)
    assert (s.temperature, s.top_p, s.top_k, s.seed, s.max_new_tokens) == (0, 0.5, 20, 1, 3)
    g = response_sampling(ResponseFields(), None)
    assert g.temperature == 0 and g.top_p == 1.0 and g.seed is None


def test_server_stop_ends_live_answers_with_their_response_done(engine):
    """The server stopping (ServerState.begin_shutdown, as at its stop signal) while a live answer
    streams: the answer ends with its response.done, cancelled for server_shutting_down, before
    the socket closes (a fresh-clone trial saw the socket closed with 1012 and no response.done)."""
    app = build_app(engine, ServerConfig(api_key=KEY))
    with serve(app) as url:
        c = Client(url)
        c.open(**SETTINGS)
        c.frames(scene_frames(1, 4, seed=6))
        c.ask("Talk for a long time.", max_output_tokens=2000)
        c.until("response.output_text.delta")
        app.state.omni.begin_shutdown()
        _, done = c.until("response.done")
        assert done["response"]["status"] == "cancelled"
        assert done["response"]["status_details"]["reason"] == "server_shutting_down"
        # then the documented end: session_expired, and a close with 1001 (going away); it was
        # uvicorn's 1012 and no event (a fresh-clone trial)
        _, err = c.until("error")
        assert err["error"]["code"] == "session_expired" and "shutting down" in err["error"]["message"], err
        opcode, data = c.ws.recv_data(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE and struct.unpack("!H", data[:2])[0] == 1001
        c.close()
