"""POST /v1/chat/completions end to end: the real `openai` client against a loopback uvicorn
server on the demo model. Answers are compared with Engine.generate on the same messages
(greedy, or the same seeds), streamed with non-streamed, and the ops routes are checked."""

from __future__ import annotations

import base64
import logging
import re
import time

import httpx
import openai
import pytest

from omnistream import Engine, SamplingParams
from omnistream.media.samples import write_image, write_sample_video
from omnistream.server.app import build_app
from omnistream.server.config import ServerConfig
from omnistream.server.tokens import TokenText
from tests.server_util import serve

MODEL = "demo-model"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    return {"root": root, "png": write_image(root / "img.png", width=64, height=48),
            "mp4": write_sample_video(root / "clip.mp4", seconds=2, fps=4, width=112, height=112)}


@pytest.fixture(scope="module")
def engine():
    e = Engine.from_pretrained("demo", engine_process=True)  # as `omnistream serve` runs it
    yield e
    e.close()


@pytest.fixture(scope="module")
def app(engine, media):
    return build_app(engine, ServerConfig(allowed_media_path=media["root"]))


@pytest.fixture(scope="module")
def base_url(app):
    with serve(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


def data_url(path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def generate(engine, messages, **sampling) -> str:
    [res] = engine.generate(messages, SamplingParams(**sampling))
    return res.text


def stream_text(client, **kwargs) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(model=MODEL, stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_models_health_and_request_id(client, base_url):
    [card] = client.models.list().data
    assert card.id == MODEL and card.object == "model"
    health = httpx.get(base_url + "/health")
    assert health.status_code == 200 and health.json() == {"status": "ok", "model": MODEL, "engine_alive": True}
    r = httpx.get(base_url + "/v1/models", headers={"x-request-id": "trace-42"})
    assert r.headers["x-request-id"] == "trace-42"
    assert re.fullmatch(r"[0-9a-f]{32}", httpx.get(base_url + "/v1/models").headers["x-request-id"])


def test_access_log_line_per_request(client, caplog):
    with caplog.at_level(logging.INFO, logger="omnistream.server.access"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       extra_headers={"x-request-id": "trace-log-1"}, **GREEDY)
        with pytest.raises(openai.NotFoundError):
            client.models.with_raw_response.retrieve("x", extra_headers={"x-request-id": "trace-log-2"})
        deadline = time.monotonic() + 5  # the line is written once the response has been sent
        while sum("trace-log-" in r.getMessage() for r in caplog.records) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    lines = [r.getMessage() for r in caplog.records if r.name == "omnistream.server.access"]
    [one] = [x for x in lines if x.startswith("trace-log-1 ")]
    [two] = [x for x in lines if x.startswith("trace-log-2 ")]
    assert re.fullmatch(r"trace-log-1 POST /v1/chat/completions 200 [\d.]+ ms", one)
    assert re.fullmatch(r"trace-log-2 GET /v1/models/x 404 [\d.]+ ms", two)


def test_text_streamed_equals_non_streamed_equals_generate(client, engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe a red fox."}]
    ref = generate(engine, messages, max_new_tokens=20, ignore_eos=True)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, **GREEDY)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    [choice] = r.choices
    assert choice.message.content == ref and choice.message.role == "assistant" and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 20 and r.usage.total_tokens == r.usage.prompt_tokens + 20
    text, chunks = stream_text(client, messages=messages, max_completion_tokens=20, stream_options={"include_usage": True},
                               **GREEDY)
    assert text == ref
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == ["length"] and chunks[-2].choices[0].finish_reason == "length"  # once, in the last chunk
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_eos_finishes_with_stop(client, engine):
    """Without ignore_eos the answer may end on the model's stop token: both paths agree."""
    messages = [{"role": "user", "content": "Say something."}]
    ref = engine.generate(messages, SamplingParams(max_new_tokens=200))[0]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=200, temperature=0)
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason


def test_image_data_url_and_file_path(client, engine, media):
    question = {"type": "text", "text": "What is in the picture?"}
    ref = generate(engine, [{"role": "user", "content": [{"type": "image", "image": str(media["png"])}, question]}],
                   max_new_tokens=12, ignore_eos=True)
    url = data_url(media["png"], "image/png")
    parts = [{"type": "image_url", "image_url": {"url": url}}, question]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}], max_tokens=12, **GREEDY)
    assert r.choices[0].message.content == ref and r.metrics["media_items_reused"] == 0
    # the same bytes from a local file (relative to the allowed root): decoded once, reused
    for src in ("img.png", f"file://{media['png']}"):
        parts = [{"type": "image_url", "image_url": {"url": src}}, question]
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}], max_tokens=12,
                                           **GREEDY)
        assert r.choices[0].message.content == ref
        assert r.metrics["media_items_reused"] == 1 and r.metrics["media_decode_s"] == 0.0


def test_video_per_part_options_and_resent_video_is_neither_decoded_nor_encoded(client, engine, media):
    opts = {"fps": 2, "max_pixels": 112 * 112, "min_pixels": 56 * 56}
    turn1 = "What moves in the video?"
    ref_messages = [{"role": "user", "content": [{"type": "video", "video": str(media["mp4"]), **opts},
                                                 {"type": "text", "text": turn1}]}]
    ref = generate(engine, ref_messages, max_new_tokens=10, ignore_eos=True)
    video = {"type": "video_url", "video_url": {"url": data_url(media["mp4"], "video/mp4"), **opts}}
    first = [{"role": "user", "content": [video, {"type": "text", "text": turn1}]}]
    r1 = client.chat.completions.create(model=MODEL, messages=first, max_tokens=10, **GREEDY)
    assert r1.choices[0].message.content == ref
    assert r1.metrics["media_decode_s"] > 0 and r1.metrics["media_tokens"] > 0
    # a stateless second turn re-sends the whole conversation, video included
    encoded = engine.stats()["vision_tokens_encoded"]
    second = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                      {"role": "user", "content": "And then?"}]
    r2 = client.chat.completions.create(model=MODEL, messages=second, max_tokens=10, **GREEDY)
    assert r2.metrics["media_items_reused"] == 1 and r2.metrics["media_decode_s"] == 0.0
    assert engine.stats()["vision_tokens_encoded"] == encoded  # served from the prefix cache
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens - 16
    ref2 = ref_messages + [{"role": "assistant", "content": r1.choices[0].message.content},
                           {"role": "user", "content": "And then?"}]
    assert r2.choices[0].message.content == generate(engine, ref2, max_new_tokens=10, ignore_eos=True)
    # request-level mm_processor_kwargs (vLLM) give the same item as the per-part fields
    plain = {"type": "video_url", "video_url": {"url": data_url(media["mp4"], "video/mp4")}}
    r3 = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [plain, first[0]["content"][1]]}],
                                        max_tokens=10, temperature=0,
                                        extra_body={"ignore_eos": True, "mm_processor_kwargs": opts})
    assert r3.choices[0].message.content == ref and r3.metrics["media_items_reused"] == 1


def test_two_turn_text_conversation_reports_cached_tokens(client):
    history = [{"role": "system", "content": "You are a careful assistant who answers in one sentence."},
               {"role": "user", "content": "Name three rivers of Europe and say where each one starts."}]
    r1 = client.chat.completions.create(model=MODEL, messages=history, max_tokens=8, **GREEDY)
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    history += [{"role": "assistant", "content": r1.choices[0].message.content}, {"role": "user", "content": "Why?"}]
    r2 = client.chat.completions.create(model=MODEL, messages=history, max_tokens=8, **GREEDY)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and cached % 16 == 0 and cached >= (r1.usage.prompt_tokens // 16) * 16 - 16


def test_n_choices_with_seeds_match_generate(client, engine):
    messages = [{"role": "user", "content": "Tell me a story."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, n=2, seed=7, temperature=1.0, top_p=0.9,
                                       max_tokens=10, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    for i, c in enumerate(r.choices):  # choice i is seeded seed + i
        assert c.message.content == generate(engine, messages, temperature=1.0, top_p=0.9, seed=7 + i,
                                             max_new_tokens=10, ignore_eos=True)
    assert r.choices[0].message.content != r.choices[1].message.content
    assert r.usage.completion_tokens == 20
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, n=2, seed=7, temperature=1.0,
                                                 top_p=0.9, max_tokens=10, stream=True,
                                                 extra_body={"ignore_eos": True}))
    for i, c in enumerate(r.choices):
        mine = [ch.choices[0] for ch in chunks if ch.choices and ch.choices[0].index == i]
        assert "".join(x.delta.content or "" for x in mine) == c.message.content
        assert [x.finish_reason for x in mine if x.finish_reason] == ["length"]


def test_stop_string_cuts_text_and_aborts(client, engine):
    messages = [{"role": "user", "content": "Count slowly."}]
    full = generate(engine, messages, max_new_tokens=40, ignore_eos=True)
    k = next(k for k in range(8, len(full) - 3) if full.find(full[k:k + 3]) == k and full[k:k + 3].strip())
    stop = full[k:k + 3]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, stop=[stop, "\x00never"], **GREEDY)
    assert r.choices[0].message.content == full[:k] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 40
    text, chunks = stream_text(client, messages=messages, max_tokens=40, stop=stop, **GREEDY)
    assert text == full[:k]
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    stats = engine.stats()
    assert stats["requests_running"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_logprobs_match_the_engine(client, engine):
    messages = [{"role": "user", "content": "Pick a number."}]
    [ref] = engine.generate(messages, SamplingParams(max_new_tokens=6, ignore_eos=True), logprobs=3)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, logprobs=True, top_logprobs=3,
                                       **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    pieces = TokenText(engine.tokenizer)
    for entry, token, (lp, top) in zip(content, ref.token_ids, ref.logprobs):  # float32, prefix cache or not
        assert (entry.token, entry.bytes) == pieces.piece(token)
        assert entry.logprob == pytest.approx(lp, abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([v for _, v in top], abs=1e-4)
        assert [(t.token, t.bytes) for t in entry.top_logprobs] == [pieces.piece(t) for t, _ in top]
        assert entry.top_logprobs[0].token == entry.token and entry.bytes == entry.top_logprobs[0].bytes
    joined = b"".join(bytes(e.bytes) for e in content).decode("utf-8", errors="replace")
    assert joined == r.choices[0].message.content or not engine.tokenizer.added_token_ids.isdisjoint(ref.token_ids)
    text, chunks = stream_text(client, messages=messages, max_tokens=6, logprobs=True, top_logprobs=3, **GREEDY)
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.logprob for e in streamed] == [e.logprob for e in content]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, **GREEDY)
    assert plain.choices[0].logprobs is None


def test_metrics_exposition(client, base_url):
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, **GREEDY)
    text = httpx.get(base_url + "/metrics").text
    samples = {m.group(1): float(m.group(2)) for m in re.finditer(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", text, re.M)}
    assert samples["omnistream_time_to_first_token_seconds_count"] >= 1
    assert samples["omnistream_inter_token_latency_seconds_count"] >= 2
    assert samples["omnistream_generation_tokens_total"] >= 3 and samples["omnistream_prompt_tokens_total"] > 0
    assert samples["omnistream_prompt_cached_tokens_total"] > 0  # the two-turn and repeated requests
    assert samples['omnistream_http_requests_total{status="200"}'] >= 1
    assert samples["omnistream_kv_blocks_used"] + samples["omnistream_kv_blocks_free"] == samples["omnistream_kv_blocks_total"]
    assert samples["omnistream_requests_running"] == 0 and samples["omnistream_requests_waiting"] == 0
    assert 0 < samples["omnistream_prefix_cache_hit_rate"] < 1
    for name in ("omnistream_encoder_cache_hit_rate", "omnistream_open_sessions", "omnistream_live_sessions",
                 "omnistream_engine_up", 'omnistream_requests_finished_total{finish_reason="length"}'):
        assert name in samples, name


def test_server_default_max_tokens_applies_when_a_request_sets_none(client, app):
    """`serve --max-new-tokens N` (state.default_max_tokens) had no effect: the route used 4096."""
    state = app.state.omni
    state.default_max_tokens = 3
    try:
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a long story"}],
                                           temperature=0, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    finally:
        state.default_max_tokens = None


def _finished(base_url) -> dict[str, float]:
    text = httpx.get(base_url + "/metrics").text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r'^omnistream_requests_finished_total\{finish_reason="(\w+)"\} (\S+)$', text, re.M)}


def test_metrics_count_stop_strings_as_stop_and_dropped_streams_as_abort(client, base_url):
    """A stop string ends the engine request by an abort: it is counted as "stop" (the client's
    finish_reason). A stream the client drops mid-answer is counted (as "abort") once it ends."""
    before = _finished(base_url)
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "count"}], max_tokens=40,
                                         stop=[" "], **GREEDY)
    assert out.choices[0].finish_reason in ("stop", "length")
    stopped = out.choices[0].finish_reason == "stop"
    with httpx.stream("POST", base_url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 4000, "stream": True,
            "ignore_eos": True, "temperature": 0}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 4:
                break  # the client leaves mid-answer
    deadline = time.time() + 30
    while time.time() < deadline:
        after = _finished(base_url)
        if after.get("abort", 0) > before.get("abort", 0):
            break
        time.sleep(0.2)
    assert after.get("abort", 0) == before.get("abort", 0) + 1  # the dropped stream only
    text = httpx.get(base_url + "/metrics").text
    assert re.search(r'^omnistream_http_requests_total\{status="499"\} [1-9]', text, re.M)  # not counted as a 200
    if stopped:
        assert after.get("stop", 0) == before.get("stop", 0) + 1
