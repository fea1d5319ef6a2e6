"""Media encoded ahead of the steps that reach them (engine/encode_ahead.py): no step encodes in
the step itself, every patch is encoded once, prompts are scheduled only up to media that are
ready, tokens and logits equal the in-step path and transformers (encoder cache off and on,
several requests at once), media the prefix cache already holds are not encoded, and what is
held ahead stays bounded."""

from __future__ import annotations

import pytest

from omnistream.engine.sampling import SamplingParams
from omnistream.models.prompt import build_prompt
from tests.reference import assert_close_logits, reference_logits
from tests.test_encoder_cache import TPP, _frames, _image, _same, _user, _video
from tests.test_vision_chunks import CONV, StepLog, _engine as _plain_engine

GREEDY = SamplingParams(max_new_tokens=4, ignore_eos=True)


def _engine(tiny_model_dir, encode_ahead: bool = True, **options):
    return _plain_engine(tiny_model_dir, encode_ahead=encode_ahead, **options)


def _ahead_encoded(eng) -> int:
    return eng.llm.ahead.groups_launched


@pytest.mark.parametrize("cache_bytes", [0, 1 << 20])
def test_chunks_run_on_media_encoded_ahead_exactly(tiny_model_dir, hf_tiny_model, cache_bytes):
    [expected] = _engine(tiny_model_dir, encode_ahead=False).generate([CONV], GREEDY, return_logits=True)
    eng = _engine(tiny_model_dir, max_num_batched_tokens=24, encoder_cache_bytes=cache_bytes)
    log = StepLog(eng.llm.runner)
    before = eng.vision_tokens_encoded
    [res] = eng.generate([CONV], GREEDY, return_logits=True)
    assert len([s for s in log.steps if any(start < req.prompt_len for req, start, _ in s[0])]) >= 6
    assert all(enc == 0 for _, enc in log.steps), "a step encoded media itself"
    assert eng.vision_tokens_encoded - before == sum(m.num_tokens for m in eng.load_media(CONV))  # each patch once
    assert _ahead_encoded(eng) >= 1 and res.metrics.vision_encode_s > 0
    assert not log.leaks, f"embeddings or cache holds kept after the prompt was computed: {log.leaks}"
    _same(res, expected, tol=1e-4)
    items = eng.load_media(CONV)
    prompt = build_prompt(eng.tokenizer, CONV, items)
    media = [(r.offset, m) for r, m in zip(prompt.ranges, prompt.media)]
    assert_close_logits(res.logits, reference_logits(hf_tiny_model, prompt.token_ids, media, res.token_ids))
    assert not eng.llm.runner._cache_holds and not eng.llm.ahead.pending


def test_concurrent_media_requests_equal_alone(tiny_model_dir):
    convs = [[_user(_video(_frames(8, seed=s)), f"Question {s}?")] for s in range(3)] + [[_user(_image(7), "And this?")]]
    alone = [_engine(tiny_model_dir, encode_ahead=False).generate([c], GREEDY, return_logits=True)[0] for c in convs]
    eng = _engine(tiny_model_dir, max_num_batched_tokens=48)
    together = eng.generate(convs, GREEDY, return_logits=True)
    for a, b in zip(together, alone):
        _same(a, b, tol=1e-4)
    assert eng.llm.counters.decode_steps > 0  # they shared forward passes


def test_prefix_cached_media_is_not_encoded_again(tiny_model_dir):
    eng = Engine_with_prefix(tiny_model_dir)
    conv = [_user(_video(_frames(8, seed=4)), "What moves?")]
    [first] = eng.generate([conv], GREEDY, return_logits=True)
    before = eng.vision_tokens_encoded
    [again] = eng.generate([conv], GREEDY, return_logits=True)
    assert eng.vision_tokens_encoded == before  # its KV is cached: nothing to encode ahead
    assert again.metrics.cached_tokens > 0
    _same(again, first, tol=1e-4)


def Engine_with_prefix(tiny_model_dir):
    from omnistream.entrypoints.api import Engine

    return Engine.from_pretrained(tiny_model_dir, device="cpu", kv_cache_tokens=8192, block_size=16, encode_ahead=True)


def test_what_is_held_ahead_stays_bounded(tiny_model_dir):
    """A long clip with a small step budget: media encoded ahead and not yet computed never
    exceed two steps' worth of tokens (plus the patch the prompt waits on)."""
    eng = _engine(tiny_model_dir, max_num_batched_tokens=24)
    conv = [_user(_video(_frames(24, seed=5)), "Long?")]  # 12 patches of TPP tokens
    held = []
    llm = eng.llm
    step = llm.step

    def watched():
        for req in list(llm.scheduler.running) + list(llm.scheduler.waiting):
            for j, (off, item) in enumerate(req.media):
                patches = req.mm_embeds[j] or []
                held.append(sum(item.tokens_per_temporal_patch for k, p in enumerate(patches)
                                if p is not None and off + (k + 1) * item.tokens_per_temporal_patch > req.num_computed_tokens))
        return step()

    llm.step = watched
    [res] = eng.generate([conv], GREEDY)
    assert res.finish_reason == "length"
    assert max(held) <= 2 * 24 + TPP, held
    assert max(held) > 0


def test_prompts_wait_for_media_in_flight(tiny_model_dir, monkeypatch):
    """Groups that stay in flight for a few polls (as on a GPU's side stream): no step covers a
    patch still in flight, others' steps go on meanwhile, and the answers stay exact."""
    from omnistream.engine import encode_ahead

    polls: dict[int, int] = {}

    def slow_done(group) -> bool:
        polls[id(group)] = polls.get(id(group), 0) + 1
        return polls[id(group)] > 3

    monkeypatch.setattr(encode_ahead._Group, "done", slow_done)
    convs = [[_user("Just text, please.")], [_user(_video(_frames(8, seed=11)), "What now?")]]
    alone = [_engine(tiny_model_dir, encode_ahead=False).generate([c], GREEDY, return_logits=True)[0] for c in convs]
    eng = _engine(tiny_model_dir, max_num_batched_tokens=24)
    ahead, launch, bad = eng.llm.ahead, eng.llm.runner.launch, []

    def checked(out, prev=None):
        for c in out.chunks:
            for key in ahead.pending:
                if key[0] == id(c.request) and ahead._overlaps(c, key):
                    bad.append((c.request.request_id, c.start, key))
        return launch(out, prev)

    eng.llm.runner.launch = checked
    together = eng.generate(convs, GREEDY, return_logits=True)
    assert not bad, f"steps covered patches still in flight: {bad[:3]}"
    assert max(polls.values()) > 3 and ahead.groups_launched >= 1
    for a, b in zip(together, alone):
        _same(a, b, tol=1e-4)
