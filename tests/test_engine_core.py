"""The engine core: one loop shared by every caller (engine/core.py).

Checked: concurrent sessions get exactly what each gets alone (tokens and logits, against
transformers) while sharing forward passes; streaming deltas concatenate to the final text
(threads and asyncio); abort returns every block; an injected failure fails one request only;
sessions' idle KV gives way to new requests and is recomputed exactly; live sessions leave no
thread or block behind; close() frees everything."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from omnistream import Engine, SamplingParams
from omnistream.engine.protocol import EngineRequest
from omnistream.errors import BudgetError, EngineError, UserInputError
from tests.reference import assert_close_logits, reference_logits

N_CLIENTS = 16


def _engine(model_dir, **opts) -> Engine:
    opts.setdefault("kv_cache_tokens", 8192)
    return Engine.from_pretrained(model_dir, device="cpu", block_size=16, **opts)


def _context(i: int) -> str:
    """A distinct first turn per client (different lengths too)."""
    return " ".join(f"item{i}-{k}" for k in range(8 + 3 * (i % 5)))


def _conversation(eng: Engine, i: int, sampling: SamplingParams):
    s = eng.session(system="You answer briefly.")
    s.ask(_context(i), sampling)
    return s


def _run_clients(sessions, questions, sampling, barrier=None):
    out = [None] * len(sessions)

    def client(k):
        if barrier is not None:
            barrier.wait()
        out[k] = sessions[k].ask(questions[k], sampling, return_logits=True)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(len(sessions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_concurrent_sessions_equal_alone_and_share_forward_passes(tiny_model_dir, hf_tiny_model):
    sampling = SamplingParams(max_new_tokens=6, ignore_eos=True)
    questions = [f"What is item{i}-3?" for i in range(N_CLIENTS)]
    alone = []
    for i in range(N_CLIENTS):  # reference: each client alone on its own engine
        eng = _engine(tiny_model_dir)
        s = _conversation(eng, i, sampling)
        ids, media = s.prompt_for(questions[i])
        alone.append((s.ask(questions[i], sampling, return_logits=True), ids, media))
        eng.close()
    eng = _engine(tiny_model_dir)
    sessions = [_conversation(eng, i, sampling) for i in range(N_CLIENTS)]
    before = eng.stats()["engine"]
    together = _run_clients(sessions, questions, sampling, threading.Barrier(N_CLIENTS))
    after = eng.stats()["engine"]
    for (ref, ids, media), res in zip(alone, together):
        assert res.token_ids == ref.token_ids
        assert_close_logits(res.logits, reference_logits(hf_tiny_model, ids, media, res.token_ids))
    # they shared forward passes: far fewer steps than 16 separate answers would take
    steps = after["steps"] - before["steps"]
    assert after["max_seqs"] >= 4 and steps < N_CLIENTS * sampling.max_new_tokens / 2, (steps, after)
    eng.close()


def test_streaming_deltas_concatenate_to_the_final_text(tiny_model_dir):
    eng = _engine(tiny_model_dir)
    spec = eng.request_for([{"role": "user", "content": "Tell me a story about a cat."}],
                           SamplingParams(max_new_tokens=24, ignore_eos=True), logprobs=3)
    handle = eng.submit(spec)
    deltas = list(handle)
    out = handle.result()
    assert "".join(d.text for d in deltas) == out.text
    assert [t for d in deltas for t in d.token_ids] == out.token_ids
    assert len(out.logprobs) == len(out.token_ids) and all(len(top) == 3 for _, top in out.logprobs)

    async def consume():
        h = eng.submit(spec)
        parts = [d async for d in h]
        return parts, await h.aresult()

    parts, again = asyncio.run(consume())
    assert "".join(d.text for d in parts) == again.text and again.token_ids == out.token_ids
    s = eng.session()
    streamed = "".join(d.text for d in s.ask_stream("Hello there", SamplingParams(max_new_tokens=8, ignore_eos=True)))
    assert streamed == s.messages[-1]["content"]
    eng.close()


def test_abort_mid_decode_returns_every_block(tiny_model_dir):
    eng = _engine(tiny_model_dir)
    total = eng.stats()["kv_blocks_total"]
    spec = eng.request_for([{"role": "user", "content": "Count to a thousand."}], SamplingParams(max_new_tokens=2000, ignore_eos=True))
    handle = eng.submit(spec)
    seen = 0
    for delta in handle:
        seen += len(delta.token_ids)
        if seen >= 3:
            handle.abort()
    out = handle.result()
    assert out.finish_reason == "abort" and 3 <= len(out.token_ids) < 2000
    stats = eng.stats()
    assert stats["kv_blocks_free"] == total and stats["requests_running"] == 0
    eng.abort("no-such-request")  # unknown ids are ignored
    assert eng.generate([{"role": "user", "content": "Still there?"}], SamplingParams(max_new_tokens=2))[0].token_ids
    eng.close()


def test_injected_failure_fails_one_request_and_the_others_are_exact(tiny_model_dir):
    sampling = SamplingParams(max_new_tokens=5, ignore_eos=True)
    convs = [[{"role": "user", "content": f"Question number {i}: {_context(i)}"}] for i in range(N_CLIENTS)]
    ref_eng = _engine(tiny_model_dir)
    expected = [ref_eng.generate(c, sampling)[0].token_ids for c in convs]
    ref_eng.close()
    eng = _engine(tiny_model_dir)
    runner = eng.llm.runner
    launch = runner.launch

    def failing_launch(out, prev=None):  # one request breaks every step it is part of
        if any(c.request.request_id == "bad" for c in out.chunks):
            raise RuntimeError("injected fault")
        return launch(out, prev)

    runner.launch = failing_launch
    specs = [eng.request_for(c, sampling) for c in convs]
    specs[5].request_id = "bad"
    handles = [eng.submit(s) for s in specs]
    for i, h in enumerate(handles):
        if i == 5:
            with pytest.raises(EngineError, match="injected fault"):
                h.result(60)
        else:
            assert h.result(60).token_ids == expected[i]
    stats = eng.stats()
    assert stats["engine"]["failed_steps"] >= 1 and stats["kv_blocks_free"] == stats["kv_blocks_total"]
    runner.launch = launch
    assert eng.generate(convs[5], sampling)[0].token_ids == expected[5]  # the engine is fine
    eng.close()


def test_never_fitting_request_fails_at_once_and_leaves_nothing_queued(tiny_model_dir):
    eng = _engine(tiny_model_dir, kv_cache_tokens=256)
    spec = eng.request_for([{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=1000))
    with pytest.raises(BudgetError, match="KV pool"):
        eng.submit(spec)
    with pytest.raises(UserInputError):
        eng.submit(EngineRequest([]))
    stats = eng.stats()
    assert stats["requests_waiting"] == 0 and stats["requests_running"] == 0
    assert eng.generate([{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=3))[0].token_ids
    eng.close()


def test_retained_sessions_filling_the_pool_give_way_and_recompute_exactly(tiny_model_dir, hf_tiny_model):
    sampling = SamplingParams(max_new_tokens=4, ignore_eos=True)
    eng = _engine(tiny_model_dir, kv_cache_tokens=1024)
    long_turn = " ".join(f"fact{k}" for k in range(120))  # ~250 tokens each
    sessions = []
    for i in range(4):  # retained KV of 4 sessions fills most of the 64-block pool
        s = eng.session()
        s.ask(f"{i} {long_turn}", sampling)
        sessions.append(s)
    assert eng.stats()["kv_blocks_retained"] >= 48
    newcomer = eng.generate([{"role": "user", "content": "new " + long_turn + long_turn}], sampling)[0]
    assert newcomer.token_ids
    assert eng.stats()["prefix_cache"]["retained_evictions"] >= 1
    # the evicted sessions answer their next question exactly (KV recomputed)
    for s in sessions:
        ids, media = s.prompt_for("And then?")
        res = s.ask("And then?", sampling, return_logits=True)
        assert_close_logits(res.logits, reference_logits(hf_tiny_model, ids, media, res.token_ids))
    for s in sessions:
        s.close()
    stats = eng.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    eng.close()


def _frames(n, seed=0, side=64):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
    return [np.roll(base, i, axis=1) for i in range(n)]


def _live_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("live-")]


def test_hundred_live_sessions_leave_no_thread_and_no_block(tiny_model_dir):
    eng = _engine(tiny_model_dir, kv_cache_tokens=4096, encoder_cache_bytes=4 << 20)
    for i in range(100):
        live = eng.live_session(max_pixels=56 * 56, policy="fast" if i % 2 else "exact")
        live.add_frames(_frames(3, seed=i), [0.0, 0.5, 1.0])
        if i % 10 == 0:
            live.ask("What?", SamplingParams(max_new_tokens=2, ignore_eos=True))
        live.close()
    assert not _live_threads()
    stats = eng.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["sessions"] == 0
    assert stats["kv_blocks_owned"] == 0 and stats["kv_blocks_retained"] == 0
    eng.close()


def test_close_frees_everything_and_later_calls_fail_clearly(tiny_model_dir):
    eng = _engine(tiny_model_dir)
    s = eng.session()
    s.ask("Hello", SamplingParams(max_new_tokens=2))
    live = eng.live_session(max_pixels=56 * 56)
    live.add_frames(_frames(4), [0.0, 0.5, 1.0, 1.5])
    pending = eng.submit(eng.request_for([{"role": "user", "content": "Long answer"}], SamplingParams(max_new_tokens=100000 // 64, ignore_eos=True)))
    eng.close()
    assert not _live_threads() and not eng.core._thread.is_alive()
    assert s.closed and live.closed
    with pytest.raises(EngineError):
        pending.result(10)
    with pytest.raises(EngineError, match="closed"):
        eng.generate([{"role": "user", "content": "hi"}])


def test_live_bad_frame_or_timestamp_fails_that_call_only(tiny_model_dir):
    eng = _engine(tiny_model_dir, kv_cache_tokens=4096, encoder_cache_bytes=4 << 20)
    live = eng.live_session(max_pixels=56 * 56)
    frames = _frames(4)
    live.add_frames(frames[:2], [0.0, 0.5])
    with pytest.raises(UserInputError):
        live.add_frame("not a frame", 1.0)
    with pytest.raises(UserInputError, match="timestamp"):
        live.add_frame(frames[2], 0.1)  # before the previous one
    live.add_frames(frames[2:], [1.0, 1.5])  # the session goes on
    live.flush(timeout=60)
    res = live.ask("What?", SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert res.token_ids and live.memory.stats().frames_added == 4
    live.close()
    eng.close()


@pytest.mark.parametrize("policy", ["exact", "fast"])
def test_trailing_odd_frame_is_part_of_the_answer(tiny_model_dir, hf_tiny_model, policy):
    sampling = SamplingParams(max_new_tokens=3, ignore_eos=True)
    eng = _engine(tiny_model_dir, kv_cache_tokens=4096, encoder_cache_bytes=4 << 20)
    live = eng.live_session(max_pixels=56 * 56, policy=policy, prefill_on_arrival=False)
    frames = _frames(5, seed=3)
    live.add_frame(frames[0], 0.0)
    one = live.ask("What?", sampling)  # a single frame: padded into one patch
    assert one.token_ids and one.live.frames_in_context == 1 and one.live.visual_tokens == 4
    live.add_frames(frames[1:], [0.5, 1.0, 1.5, 2.0])  # 5 frames: 2 patches + the 5th padded
    res = live.ask("And now?", sampling, return_logits=True)
    assert res.live.visual_tokens == 3 * 4 and res.live.frames_in_context == 5
    if policy == "exact":  # equal to a fresh run whose video repeats the odd frame (Qwen's padding)
        ids, media = live.prompt_for("And now?")
        assert media[0][1].grid_thw[0] == 3
        live.add_frame(frames[4], 2.5)  # its pair arrives: the real patch replaces the padded one
        live.flush(timeout=60)
        assert live.video_item().timestamps[-2:] == [2.0, 2.5]
    live.close()
    eng.close()


@pytest.mark.parametrize("opts", [{"max_pixels": 0}, {"max_pixels": -5}, {"min_pixels": 100_000, "max_pixels": 56 * 56}])
def test_live_session_pixel_bounds_are_checked(tiny_model_dir, opts):
    eng = _engine(tiny_model_dir, kv_cache_tokens=1024, encoder_cache_bytes=1 << 20)
    with pytest.raises(UserInputError, match="pixels"):
        eng.live_session(**opts)
    eng.close()


def test_stream_deltas_decode_incrementally_and_join_to_the_final_text(tiny_tokenizer):
    """Deltas decode a window of tokens, not the whole answer each time; multi-byte characters
    split across tokens are held back, and the deltas join to the whole decode."""
    from omnistream.engine.handle import RequestHandle
    from omnistream.engine.protocol import RequestMetrics, RequestOutput

    ids = tiny_tokenizer.encode("Héllo 你好世界 🙂🙂 done, über naïve façade — ok")
    decoded_lengths = []

    def decode(tokens):
        decoded_lengths.append(len(tokens))
        return tiny_tokenizer.decode(tokens)

    h = RequestHandle("r", decode, lambda _: None)
    reader = iter(h)
    deltas = []
    for k, t in enumerate(ids):
        h._push(t, None)
        if k == len(ids) - 1:
            h._end(RequestOutput(request_id="r", token_ids=list(ids), text=None, finish_reason="length", metrics=RequestMetrics()))
        deltas.append(next(reader))
    assert "".join(d.text for d in deltas) == tiny_tokenizer.decode(ids)
    assert all("\ufffd" not in d.text for d in deltas)
    assert max(decoded_lengths[:-1]) < 8  # windows, never the whole answer before the end
