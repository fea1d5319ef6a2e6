"""Sessions, prefix cache and encoder cache: exact against transformers recomputing everything.

The reference for each turn is the transformers model fed the session's whole token sequence
(history = the template's turns with the engine's own answer ids) with every media item."""

from __future__ import annotations

import numpy as np
import pytest

from omnistream.entrypoints.api import Engine
from omnistream.engine.sampling import SamplingParams
from omnistream.errors import UnknownSessionError, UserInputError
from tests.reference import assert_close_logits, reference_logits

GREEDY = SamplingParams(max_new_tokens=5, ignore_eos=True)


def _frames(n, h, w, seed):
    base = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return {"frames": [np.roll(base, 5 * i, axis=0) for i in range(n)], "timestamps": [i * 0.5 for i in range(n)]}


def _image(seed):
    return np.random.default_rng(seed).integers(0, 255, (70, 98, 3), dtype=np.uint8)


def _engine(model_dir, **opts) -> Engine:
    opts.setdefault("kv_cache_tokens", 8192)
    return Engine.from_pretrained(model_dir, device="cpu", block_size=16, **opts)


NOISE = [{"role": "user", "content": " ".join(f"word{i}" for i in range(60))}]


def _six_turns(eng: Engine, hf, check: bool = True, noise: bool = False) -> list[list[int]]:
    """A 6-turn conversation mixing a video, an image and text; returns each turn's tokens."""
    s = eng.session(system="You watch videos.")
    out = []
    plan = [
        ("video", _frames(8, 84, 112, 1), "What happens in the video?"),
        (None, None, "Say more."),
        ("image", _image(2), "How does this picture relate to it?"),
        (None, None, "Which came first?"),
        ("text", "Context: the camera is static.", "Does that change your answer?"),
        (None, None, "Summarise everything."),
    ]
    for kind, src, question in plan:
        if kind == "video":
            s.add_video(src, max_pixels=112 * 112)
        elif kind == "image":
            s.add_image(src)
        elif kind == "text":
            s.add_text(src)
        ids, media = s.prompt_for(question)
        res = s.ask(question, GREEDY, return_logits=True)
        if check:
            assert_close_logits(res.logits, reference_logits(hf, ids, media, res.token_ids))
        out.append(res.token_ids)
        if noise:  # other traffic between turns pushes unpinned blocks out of the pool
            eng.generate([NOISE], SamplingParams(max_new_tokens=2))
    s.close()
    return out


def test_six_turns_caches_on_off_and_reference(tiny_model_dir, hf_tiny_model):
    on = _six_turns(_engine(tiny_model_dir, encoder_cache_bytes=1 << 22), hf_tiny_model)
    off = _six_turns(_engine(tiny_model_dir, enable_prefix_caching=False), hf_tiny_model, check=False)
    assert on == off


def test_follow_up_prefills_only_new_tokens(tiny_model_dir):
    eng = _engine(tiny_model_dir, encoder_cache_bytes=1 << 22)
    s = eng.session()
    s.add_video(_frames(8, 84, 112, 3), max_pixels=112 * 112)
    first = s.ask("What happens?", GREEDY)
    encoded = eng.stats()["vision_tokens_encoded"]
    second = s.ask("And then?", GREEDY)
    assert first.metrics.cached_tokens == 0
    # everything before the new turn was served from the session's KV (all but a partial block)
    assert second.metrics.prompt_tokens - second.metrics.cached_tokens < 16 + 20
    assert eng.stats()["vision_tokens_encoded"] == encoded  # no vision work on a follow-up
    assert second.metrics.vision_encode_s == 0.0
    assert s.pinned_tokens > 0


def test_tiny_budget_evicts_between_turns_and_stays_exact(tiny_model_dir, hf_tiny_model):
    # a KV pool barely larger than one turn and a session budget of one block: blocks and
    # encoder entries are evicted between turns and recomputed
    eng = _engine(tiny_model_dir, kv_cache_tokens=320, session_kv_budget_tokens=16, encoder_cache_bytes=9000)
    other = _engine(tiny_model_dir)  # reference tokens from a roomy engine
    assert _six_turns(eng, hf_tiny_model, noise=True) == _six_turns(other, hf_tiny_model, check=False)
    assert eng.llm.blocks.stats.evictions > 0


def test_two_sessions_share_a_video(tiny_model_dir, hf_tiny_model):
    eng = _engine(tiny_model_dir, encoder_cache_bytes=1 << 22)
    clip = _frames(8, 84, 112, 4)
    a, b = eng.session(), eng.session()
    a.add_video(clip, max_pixels=112 * 112)
    a.ask("What happens?", GREEDY)
    encoded = eng.stats()["vision_tokens_encoded"]
    b.add_video(clip, max_pixels=112 * 112)
    ids, media = b.prompt_for("Describe the colours.")
    res = b.ask("Describe the colours.", GREEDY, return_logits=True)
    assert eng.stats()["vision_tokens_encoded"] == encoded  # zero vision work for session b
    assert res.metrics.cached_tokens >= 48  # system + video blocks came from session a
    assert_close_logits(res.logits, reference_logits(hf_tiny_model, ids, media, res.token_ids))


def test_different_videos_of_identical_length_never_share_blocks(tiny_model_dir):
    eng = _engine(tiny_model_dir)
    a, b = eng.session(), eng.session()
    a.add_video(_frames(8, 84, 112, 5), max_pixels=112 * 112)
    b.add_video(_frames(8, 84, 112, 6), max_pixels=112 * 112)
    a.ask("What happens?", GREEDY)
    res = b.ask("What happens?", GREEDY)
    offset = b.media[0][0]
    assert res.metrics.cached_tokens <= offset  # only the text before the video is shared
    shared = set(a.retained_blocks()) & set(b.retained_blocks())
    assert all(i * 16 + 16 <= offset for i, blk in enumerate(b.retained_blocks()) if blk in shared)


def test_tenants_do_not_share(tiny_model_dir):
    eng = _engine(tiny_model_dir)
    clip = _frames(8, 84, 112, 7)
    for tenant in ("t1", "t2"):
        s = eng.session(tenant=tenant)
        s.add_video(clip, max_pixels=112 * 112)
        res = s.ask("What happens?", GREEDY)
        assert res.metrics.cached_tokens == 0


def test_fork_close_and_unknown_session(tiny_model_dir, hf_tiny_model):
    eng = _engine(tiny_model_dir)
    s = eng.session()
    s.add_video(_frames(8, 84, 112, 8), max_pixels=112 * 112)
    s.ask("What happens?", GREEDY)
    f = s.fork()
    ids, media = f.prompt_for("Another question?")
    res = f.ask("Another question?", GREEDY, return_logits=True)
    assert_close_logits(res.logits, reference_logits(hf_tiny_model, ids, media, res.token_ids))
    assert res.metrics.cached_tokens > 0
    s.close()
    f.close()
    assert eng.llm.blocks.num_free == eng.llm.blocks.num_blocks  # nothing leaked
    with pytest.raises(UnknownSessionError):
        eng.get_session(s.id)
    with pytest.raises(UserInputError):
        s.ask("still there?")


def test_row_batch_path_for_short_chunks(tiny_model_dir, hf_tiny_model):
    """The CUDA-graph row path (decodes and short text chunks as independent rows over the
    paged cache), run without capture on the CPU: follow-ups and batches stay exact."""
    from omnistream.layers.paged_decode import torch_paged_decode

    eng = _engine(tiny_model_dir, encoder_cache_bytes=1 << 22)
    eng.llm.runner.set_decode_backend(torch_paged_decode)
    eng.llm.runner.enable_cuda_graphs(max_context=4096, use_graphs=False)
    graphs, rows, media = eng.llm.runner.graphs, [], []
    run = graphs.run
    graphs.run = lambda out, prev=None: (rows.append(out.num_tokens), media.append(eng.llm.runner.media_rows(out.chunks)[0] is not None), run(out, prev))[2]
    _six_turns(eng, hf_tiny_model)
    assert max(rows) > 1, "no multi-row (follow-up chunk) step went through the row path"
    assert any(media), "no step with media rows (video / image embeddings) went through the row path"


def test_a_session_builds_its_request_under_the_engines_submit_lock(tiny_model_dir):
    """Concurrent builds under the interpreter lock advance round-robin (a burst all finishes
    building at once, the engine idle until then): a session renders its turn, builds its
    request and queues it holding engine.submit_lock (engine/build_queue.py), so builds run one
    at a time and each request is queued as soon as it is built."""
    with _engine(tiny_model_dir) as eng:
        s = eng.session()
        held = []
        render, prepare, send = s._render_turn, eng.core.prepare, eng.core.send
        s._render_turn = lambda user: held.append(("render", eng.submit_lock._is_owned())) or render(user)
        eng.core.prepare = lambda spec: held.append(("build", eng.submit_lock._is_owned())) or prepare(spec)
        eng.core.send = lambda p: held.append(("queue", eng.submit_lock._is_owned())) or send(p)
        assert s.ask("hello", SamplingParams(max_new_tokens=1)).token_ids
        assert held == [("render", True), ("build", True), ("queue", True)]
        assert not eng.submit_lock._is_owned()
