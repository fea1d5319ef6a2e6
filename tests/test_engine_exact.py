"""The engine against transformers on the tiny random model: logits within 1e-4 relative and
identical greedy tokens, for text, images, videos, multi-turn text and a batch of 8."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnistream.entrypoints.api import Engine
from omnistream.engine.sampling import SamplingParams
from omnistream.layers.paged_decode import torch_paged_decode
from tests.reference import assert_close_logits, reference_logits

GREEDY = SamplingParams(max_new_tokens=6, ignore_eos=True)


def _frames(n: int, h: int, w: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    # smooth motion: each frame shifts the base so consecutive frames differ
    return [np.roll(base, 7 * i, axis=1) for i in range(n)]


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _user(*parts) -> dict:
    content = []
    for p in parts:
        content.append({"type": "text", "text": p} if isinstance(p, str) else p)
    return {"role": "user", "content": content}


def _video(n, h, w, seed=0, fps=2.0):
    return {"type": "video", "video": {"frames": _frames(n, h, w, seed), "timestamps": [i / fps for i in range(n)]}, "max_pixels": 112 * 112}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.from_pretrained(tiny_model_dir, device="cpu", kv_cache_tokens=16384, block_size=16)


def _check(engine, hf_tiny_model, conversations, sampling=GREEDY):
    results = engine.generate(conversations, sampling, return_logits=True)
    for conv, res in zip(conversations, results):
        items = engine.load_media(conv)
        from omnistream.models.prompt import build_prompt

        prompt = build_prompt(engine.tokenizer, conv, items)
        media = [(r.offset, m) for r, m in zip(prompt.ranges, prompt.media)]
        ref = reference_logits(hf_tiny_model, prompt.token_ids, media, res.token_ids)
        assert_close_logits(res.logits, ref)
    return results


CASES = {
    "text": [_user("Describe a sunny day in three words.")],
    "image": [_user({"type": "image", "image": _image(90, 150, 1)}, "What is shown?")],
    "two_images": [_user({"type": "image", "image": _image(56, 84, 2)}, {"type": "image", "image": _image(120, 60, 3)}, "Compare.")],
    "video_even": [_user(_video(8, 84, 112, 4), "What happens?")],
    "video_odd_resized": [_user(_video(7, 100, 150, 5), "What happens?")],
    "image_and_video": [_user({"type": "image", "image": _image(70, 70, 6)}, _video(6, 56, 112, 7), "Relate them.")],
    "multi_turn_text": [
        {"role": "system", "content": "You are terse."},
        _user("Name a colour."),
        {"role": "assistant", "content": "Blue."},
        _user("Name another one."),
    ],
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(engine, hf_tiny_model, case):
    _check(engine, hf_tiny_model, [CASES[case]])


def test_positions_matter(engine, hf_tiny_model):
    """Guard: the tiny model must be position-sensitive, or the exactness tests prove little."""
    conv = CASES["video_even"]
    [res] = engine.generate([conv], GREEDY, return_logits=True)
    from omnistream.models.prompt import build_prompt

    items = engine.load_media(conv)
    prompt = build_prompt(engine.tokenizer, conv, items)
    media = [(r.offset, m) for r, m in zip(prompt.ranges, prompt.media)]
    ref = reference_logits(hf_tiny_model, prompt.token_ids, media, res.token_ids)
    # shuffle the media rows' temporal positions by treating the video as an image grid
    from omnistream.media.item import MediaItem

    m0 = media[0][1]
    fake = MediaItem(kind="video", pixel_values=m0.pixel_values, grid_thw=m0.grid_thw, second_per_grid_t=m0.second_per_grid_t * 3)
    ref_shifted = reference_logits(hf_tiny_model, prompt.token_ids, [(media[0][0], fake)], res.token_ids)
    rel = ((ref - ref_shifted).norm() / ref.norm()).item()
    assert rel > 1e-3, f"temporal positions change logits by only {rel:.1e}"


@pytest.mark.parametrize("chunked", [True, False])
def test_batch_of_8(tiny_model_dir, hf_tiny_model, chunked):
    budget = 64 if chunked else 4096
    eng = Engine.from_pretrained(tiny_model_dir, device="cpu", kv_cache_tokens=16384, block_size=16,
                                 max_num_batched_tokens=budget, enable_chunked_prefill=chunked)
    convs = list(CASES.values()) + [[_user("One more question about nothing.")]]
    assert len(convs) == 8
    batched = _check(eng, hf_tiny_model, convs)
    alone = [eng.generate([c], GREEDY)[0] for c in convs]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]


def test_paged_decode_kernel_path(tiny_model_dir, hf_tiny_model):
    """The CUDA-graph-safe decode path (padded block tables + length mask) on the CPU."""
    eng = Engine.from_pretrained(tiny_model_dir, device="cpu", kv_cache_tokens=4096, block_size=16)
    eng.llm.runner.set_decode_backend(torch_paged_decode)
    _check(eng, hf_tiny_model, [CASES["video_even"], CASES["text"]], SamplingParams(max_new_tokens=8, ignore_eos=True))


def test_preemption_is_exact(tiny_model_dir, hf_tiny_model):
    """A KV pool too small for all 3 requests at once: preempted requests recompute, same tokens."""
    convs = [CASES["video_even"], CASES["image"], CASES["text"]]
    eng = Engine.from_pretrained(tiny_model_dir, device="cpu", kv_cache_tokens=160, block_size=16, max_num_batched_tokens=32)
    sampling = SamplingParams(max_new_tokens=12, ignore_eos=True)
    results = _check(eng, hf_tiny_model, convs, sampling)
    assert all(len(r.token_ids) == 12 for r in results)


def test_row_path_mixed_steps(tiny_model_dir, hf_tiny_model):
    """Eager steps through the row path (torch_paged_decode on the CPU): decodes and short
    chunks (cached prefixes included) as rows of one launch, long chunks through SDPA, in the
    same step. Same greedy tokens as the reference path, logits as transformers'."""
    def make():
        e = Engine.from_pretrained(tiny_model_dir, device="cpu", kv_cache_tokens=16384, block_size=16, max_num_batched_tokens=128)
        e.generate([CASES["multi_turn_text"]], SamplingParams(max_new_tokens=2))  # a cached prefix for later
        return e

    plain, rows = make(), make()
    runner = rows.llm.runner
    runner.set_row_backend(torch_paged_decode, max_query=32)
    steps, prepare = [], runner.prepare

    def spy(out):
        batch = prepare(out)
        ordered, _ = runner.batch_order(out.chunks)
        steps.append([(c.start, c.num_tokens, i < batch.meta.num_row_seqs) for i, c in enumerate(ordered)])
        return batch

    runner.prepare = spy
    convs = list(CASES.values())
    sampling = SamplingParams(max_new_tokens=4, ignore_eos=True)
    ours = _check(rows, hf_tiny_model, convs, sampling)
    assert [r.token_ids for r in ours] == [r.token_ids for r in plain.generate(convs, sampling)]
    mixed = [s for s in steps
             if any(row and n == 1 for _, n, row in s)  # a decode
             and any(row and n > 1 and start > 0 for start, n, row in s)  # a short chunk over a cached prefix
             and any(not row for *_, row in s)]  # a long chunk
    assert mixed, f"no step mixed decodes, short chunks and a long chunk: {steps}"


def test_raw_and_normalised_rows_in_one_encoder_forward(engine, hf_tiny_model):
    """The processor keeps rows uint8 (normalised on the device); an item with float rows (as a
    caller may build one) encoded in the same vision forward is normalised apart, not promoted
    to float by torch.cat and left raw. Same logits as transformers either way."""
    from omnistream.engine.protocol import EngineRequest
    from omnistream.media.patchify import normalize_rows
    from omnistream.models.prompt import build_prompt

    conv = CASES["image_and_video"]
    items = engine.load_media(conv)
    assert all(m.pixel_values.dtype == torch.uint8 for m in items)
    items[0].pixel_values = normalize_rows(items[0].pixel_values)  # the image as float rows
    items[0].content_hash = items[0].patch_hashes = None  # a caller's item: not in any cache
    prompt = build_prompt(engine.tokenizer, conv, items)
    media = [(r.offset, m) for r, m in zip(prompt.ranges, prompt.media)]
    res = engine.submit(EngineRequest(token_ids=prompt.token_ids, media=media, sampling=GREEDY, return_logits=True)).result()
    assert_close_logits(res.logits, reference_logits(hf_tiny_model, prompt.token_ids, media, res.token_ids))
