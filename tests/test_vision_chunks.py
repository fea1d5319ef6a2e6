"""Vision encoding budgeted per chunk (the in-step path, encode_ahead off): a prompt prefilled in
several chunks encodes, in each step, only the temporal patches that the step's chunk covers and
that are not encoded yet; its tokens and logits equal the unchunked run and transformers, with
the encoder cache off and on; embeddings and cache holds are dropped once the prompt is
computed. (Media encoded ahead of the steps: tests/test_encode_ahead.py.)"""

from __future__ import annotations

import pytest

from omnistream.entrypoints.api import Engine
from omnistream.engine.sampling import SamplingParams
from omnistream.models.prompt import build_prompt
from tests.reference import assert_close_logits, reference_logits
from tests.test_encoder_cache import TPP, _frames, _image, _same, _user, _video

GREEDY = SamplingParams(max_new_tokens=4, ignore_eos=True)


def _engine(tiny_model_dir, **options) -> Engine:
    return Engine.from_pretrained(tiny_model_dir, device="cpu", kv_cache_tokens=8192, block_size=16,
                                  enable_prefix_caching=False, **options)


class StepLog:
    """Wraps runner.launch (on the engine loop): per step, the chunks (request, start,
    num_tokens) and the vision tokens encoded; and every request whose prompt got computed but
    that still holds embeddings or encoder-cache entries (checked by the test afterwards)."""

    def __init__(self, runner) -> None:
        self.runner, self.steps, self.leaks, self._launch = runner, [], [], runner.launch
        runner.launch = self

    def __call__(self, out, prev=None):
        before = self.runner.vision_tokens_encoded
        result = self._launch(out, prev)
        self.steps.append(([(c.request, c.start, c.num_tokens) for c in out.chunks], self.runner.vision_tokens_encoded - before))
        for c in out.chunks:
            req = c.request
            if c.start + c.num_tokens >= req.prompt_len and (
                    any(e is not None for e in req.mm_embeds) or id(req) in self.runner._cache_holds):
                self.leaks.append((req.request_id, c.start))
        return result


def _first_needed(steps) -> list[int]:
    """Per step: tokens of the temporal patches that its chunks are the first to cover."""
    seen, expected = set(), []
    for chunks, _ in steps:
        n = 0
        for req, s, num in chunks:
            for j, (off, item) in enumerate(req.media):
                tpp = item.tokens_per_temporal_patch
                for k in range(item.grid_thw[0]):
                    lo = off + k * tpp
                    if lo < s + num and lo + tpp > s and (id(req), j, k) not in seen:
                        seen.add((id(req), j, k))
                        n += tpp
        expected.append(n)
    return expected


CONV = [_user(_image(3), _video(_frames(10, seed=2)), "What happens?")]  # image 6 + video 5 x 20 tokens


@pytest.mark.parametrize("cache_bytes", [0, 1 << 20])
def test_chunked_prefill_encodes_each_patch_once_when_first_needed(tiny_model_dir, hf_tiny_model, cache_bytes):
    whole = _engine(tiny_model_dir)
    [expected] = whole.generate([CONV], GREEDY, return_logits=True)
    eng = _engine(tiny_model_dir, max_num_batched_tokens=24, encoder_cache_bytes=cache_bytes, encode_ahead=False)
    log = StepLog(eng.llm.runner)
    [res] = eng.generate([CONV], GREEDY, return_logits=True)
    prefill = [s for s in log.steps if s[1] or any(start < req.prompt_len for req, start, _ in s[0])]
    assert len(prefill) >= 6, "the prompt should take several chunks"
    assert [enc for _, enc in log.steps] == _first_needed(log.steps)
    assert sum(enc for _, enc in log.steps) == sum(m.num_tokens for m in eng.load_media(CONV))  # every patch once
    assert sum(1 for _, enc in log.steps if enc) >= 4  # spread over the steps that need them
    assert res.metrics.vision_encode_s > 0
    assert not log.leaks, f"embeddings or cache holds kept after the prompt was computed: {log.leaks}"
    _same(res, expected, tol=1e-4)  # chunked prefill reorders float sums slightly
    items = eng.load_media(CONV)
    prompt = build_prompt(eng.tokenizer, CONV, items)
    media = [(r.offset, m) for r, m in zip(prompt.ranges, prompt.media)]
    assert_close_logits(res.logits, reference_logits(hf_tiny_model, prompt.token_ids, media, res.token_ids))
    if cache_bytes:
        cache = eng.llm.runner.encoder_cache
        assert (cache.stats.misses, cache.stats.entries) == (6, 6) and not cache._refs
        log.steps.clear()
        [again] = eng.generate([CONV], GREEDY, return_logits=True)  # every patch a hit, in its chunk
        assert sum(enc for _, enc in log.steps) == 0 and cache.stats.hits == 6
        _same(again, res)


def test_partial_hits_with_chunks(tiny_model_dir, hf_tiny_model):
    """The first 3 patches cached by an earlier, shorter clip: the chunks of the longer one
    encode only patches 3 and 4, each in the step that first covers it."""
    eng = _engine(tiny_model_dir, max_num_batched_tokens=24, encoder_cache_bytes=1 << 20, encode_ahead=False)
    stream = _frames(10, seed=9)
    eng.generate([[_user(_video(stream[:6]), "So far?")]], GREEDY)
    log = StepLog(eng.llm.runner)
    conv = [_user(_video(stream), "And now?")]
    [res] = eng.generate([conv], GREEDY, return_logits=True)
    [req] = {id(r): r for chunks, _ in log.steps for r, *_ in chunks}.values()
    off = req.media[0][0]
    # steps whose chunk first covers patch 3 or patch 4 encode exactly that patch
    firsts = [next(i for i, (chunks, _) in enumerate(log.steps) if chunks[0][1] + chunks[0][2] > off + k * TPP) for k in (3, 4)]
    assert [enc for _, enc in log.steps] == [TPP * firsts.count(i) for i in range(len(log.steps))]
    [plain] = _engine(tiny_model_dir).generate([conv], GREEDY, return_logits=True)
    _same(res, plain, tol=1e-4)
    assert not log.leaks
    assert not eng.llm.runner._cache_holds and not eng.llm.runner.encoder_cache._refs
