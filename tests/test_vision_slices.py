"""Sliced encode-ahead (EngineConfig.vision_slice_rows, engine/encode_ahead.py "Sliced"): while
answers decode, a clip's vision forward runs a few encoder blocks per decode step, so every
running answer keeps getting tokens while it is encoded; the clip's and the streams' tokens and
logits equal each one alone (in-step path, nothing sliced), every patch is encoded once, an
abort mid-encode leaves nothing behind, with nothing decoding the encode finishes whole, and a
forward encoded ahead that fails leaves the media to the steps (a request whose media cannot be
encoded fails alone)."""

from __future__ import annotations

import threading

import pytest

from omnistream.engine.sampling import SamplingParams
from omnistream.errors import ConfigError
from omnistream.stepwise import drain, run_steps
from tests.test_encoder_cache import _frames, _same, _user, _video
from tests.test_vision_chunks import _engine

STREAM = SamplingParams(max_new_tokens=48, ignore_eos=True)
CLIP = SamplingParams(max_new_tokens=4, ignore_eos=True)
TEXTS = [[_user(f"Tell a long story about the number {i}.")] for i in range(3)]
CLIP_CONV = [_user(_video(_frames(12, seed=21)), "What moves here?")]  # 6 temporal patches


def _sliced(tiny_model_dir, **options):
    # 1 pixel row x block per step: one block per step (a group counts as SLICE_MIN_ROWS rows)
    return _engine(tiny_model_dir, vision_slice_rows=1, **options)


class SliceLog:
    """Wraps the encode-ahead's advance (on the engine loop): per call, whether the step it ran
    before decodes anything and how many blocks ran (0: held back or nothing in flight)."""

    def __init__(self, eng) -> None:
        self.llm, self.calls = eng.llm, []
        self._advance = self.llm.ahead.advance
        self.llm.ahead.advance = self

    def __call__(self, prefill_tokens):
        before = self.llm.ahead.slices
        self._advance(prefill_tokens)
        self.calls.append((prefill_tokens, self.llm.ahead.slices - before))


def _streams_then_clip(eng, clip_conv=CLIP_CONV, abort_clip_after_slices: int | None = None, expect_error: bool = False):
    """The text streams start; once each has a token, the clip is asked (it arrives while they
    decode) -> (stream results, the clip's result, or the error it raised with expect_error)."""
    handles = [eng.submit(eng.request_for(c, STREAM, return_logits=True)) for c in TEXTS]
    firsts = [threading.Event() for _ in handles]
    outs: list = [None] * len(handles)

    def read(i):
        for _ in handles[i]:
            firsts[i].set()
        outs[i] = handles[i].result()
        firsts[i].set()

    readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(len(handles))]
    for t in readers:
        t.start()
    for e in firsts:
        assert e.wait(60)
    clip = eng.submit(eng.request_for(clip_conv, CLIP, return_logits=True))
    clip_out = None
    if abort_clip_after_slices is not None:
        ahead = eng.llm.ahead
        for _ in range(6000):
            if ahead.slices >= abort_clip_after_slices:
                break
            threading.Event().wait(0.005)
        clip.abort()
        clip_out = clip.result()
    elif expect_error:
        with pytest.raises(Exception) as failed:
            clip.result()
        clip_out = failed.value
    else:
        clip_out = clip.result()
    for t in readers:
        t.join(60)
    return outs, clip_out


def test_forward_steps_yields_once_per_block_and_equals_forward(tiny_model_dir):
    import torch

    eng = _engine(tiny_model_dir)
    visual = eng.llm.model.visual
    [item] = eng.load_media(CLIP_CONV)
    pixels = eng.llm.model.prepare_pixels(item.pixel_values, torch.float32)
    with torch.inference_mode():
        whole = visual(pixels, [item.grid_thw])
        gen = visual.forward_steps(pixels, [item.grid_thw])
        finished, _ = run_steps(gen, visual.num_steps)
        assert not finished  # one yield per block: the merger is still to run
        rest = drain(gen)
    # the same operations; within 1e-4 (relative, per row): once, a first forward on this CPU
    # differed from later ones in the 4th digit, with the same code
    assert ((rest - whole).norm(dim=-1) / whole.norm(dim=-1)).max().item() < 1e-4


def test_a_clip_encoded_in_slices_beside_decoding_streams_is_exact(tiny_model_dir):
    alone = [_engine(tiny_model_dir).generate([c], STREAM, return_logits=True)[0] for c in TEXTS]
    [clip_alone] = _engine(tiny_model_dir).generate([CLIP_CONV], CLIP, return_logits=True)
    eng = _sliced(tiny_model_dir)
    log = SliceLog(eng)
    depth = eng.llm.model.visual.num_steps
    before = eng.vision_tokens_encoded
    outs, clip = _streams_then_clip(eng)
    for got, want in zip(outs, alone):
        _same(got, want, tol=1e-4)
    _same(clip, clip_alone, tol=1e-4)
    ran = [(p, n) for p, n in log.calls if n]
    # the clip's forward ran one block per decode step: depth + 1 pieces (the last: the merger)
    assert len(ran) >= depth, log.calls
    assert all(p is not None for p, _ in ran), "an encode slice ran in a step without decodes"
    assert eng.vision_tokens_encoded - before == sum(m.num_tokens for m in eng.load_media(CLIP_CONV))  # each patch once
    assert clip.metrics.vision_encode_s > 0
    # only the slices count as vision time, not the decode steps between them
    assert clip.metrics.vision_encode_s < clip.metrics.first_token_at - clip.metrics.arrival
    assert not eng.llm.ahead.pending and not eng.llm.ahead.inflight and not eng.llm.runner._cache_holds


def test_a_step_with_a_large_prefill_runs_no_blocks(tiny_model_dir):
    from omnistream.engine.encode_ahead import SLICE_MAX_PREFILL

    eng = _sliced(tiny_model_dir)
    log = SliceLog(eng)
    _streams_then_clip(eng)
    assert all(p is None or p <= SLICE_MAX_PREFILL for p, n in log.calls if n), log.calls


def test_abort_mid_encode_leaves_nothing_behind(tiny_model_dir):
    eng = _sliced(tiny_model_dir)
    free = eng.llm.blocks.num_free
    alone = [_engine(tiny_model_dir).generate([c], STREAM, return_logits=True)[0] for c in TEXTS]
    outs, clip = _streams_then_clip(eng, abort_clip_after_slices=2)
    assert clip.finish_reason == "abort"
    # its encode stopped with it (no share of later steps, nothing held for nobody)
    assert not any(g.job is not None for g in eng.llm.ahead.inflight) and not eng.llm.ahead.pending
    for got, want in zip(outs, alone):
        _same(got, want, tol=1e-4)
    # the engine goes on: the same clip again is answered, exactly
    [clip_alone] = _engine(tiny_model_dir).generate([CLIP_CONV], CLIP, return_logits=True)
    [again] = eng.generate([CLIP_CONV], CLIP, return_logits=True)
    _same(again, clip_alone, tol=1e-4)
    assert not eng.llm.ahead.pending and not eng.llm.ahead.inflight and not eng.llm.runner._cache_holds
    assert eng.llm.blocks.num_free == free


def test_with_nothing_decoding_media_are_encoded_whole_in_their_step(tiny_model_dir):
    eng = _sliced(tiny_model_dir)
    log = SliceLog(eng)
    [res] = eng.generate([CLIP_CONV], CLIP, return_logits=True)
    [want] = _engine(tiny_model_dir).generate([CLIP_CONV], CLIP, return_logits=True)
    _same(res, want, tol=1e-4)
    assert eng.llm.ahead.groups_launched == 0 and not any(n for _, n in log.calls)


@pytest.mark.parametrize("options", [{"vision_slice_rows": -1}, {"vision_slice_rows": 1024, "encode_ahead": True},
                                     {"vision_slice_rows": 1024, "offload_vision": True}])
def test_bad_slice_settings_are_refused(tiny_model_dir, options):
    with pytest.raises(ConfigError, match="vision_slice_rows"):
        _engine(tiny_model_dir, **options)


def test_slices_default_on_a_gpu_only():
    from omnistream.config import DEFAULT_VISION_SLICE_ROWS, EngineConfig

    assert EngineConfig("demo").vision_slices is None  # the CPU: the exactness tests' in-step path
    assert EngineConfig("demo", vision_slice_rows=0).vision_slices is None
    assert EngineConfig("demo", vision_slice_rows=512).vision_slices == 512
    gpu = EngineConfig.__new__(EngineConfig)  # a CUDA config without a GPU here (skips the device check)
    object.__setattr__(gpu, "device", "cuda")
    for name in ("vision_slice_rows", "encode_ahead"):
        object.__setattr__(gpu, name, None if name == "vision_slice_rows" else False)
    object.__setattr__(gpu, "offload_vision", False)
    assert gpu.vision_slices == DEFAULT_VISION_SLICE_ROWS
    object.__setattr__(gpu, "offload_vision", True)
    assert gpu.vision_slices is None  # the tower lives on the host between encodes
    object.__setattr__(gpu, "offload_vision", False)
    object.__setattr__(gpu, "encode_ahead", True)
    assert gpu.vision_slices is None  # the side-stream encode-ahead asked for instead


def test_a_failing_sliced_encode_leaves_it_to_the_steps(tiny_model_dir, monkeypatch):
    """The forward encoded ahead fails once (a transient fault): it is tried again and its
    request answered exactly; the streams are untouched."""
    alone = [_engine(tiny_model_dir).generate([c], STREAM, return_logits=True)[0] for c in TEXTS]
    [clip_alone] = _engine(tiny_model_dir).generate([CLIP_CONV], CLIP, return_logits=True)
    eng = _sliced(tiny_model_dir)
    runner, calls = eng.llm.runner, []
    real = runner.vision_steps

    def failing_once(items, sliced=True):
        calls.append(len(items))
        if len(calls) == 1:  # the generator fails at its first step, as a fault in the tower would
            def fault():
                raise RuntimeError("injected encoder fault")
                yield
            return fault()
        return real(items, sliced)

    monkeypatch.setattr(runner, "vision_steps", failing_once)
    outs, clip = _streams_then_clip(eng)
    assert len(calls) >= 2 and eng.llm.ahead.failures == 1 and not eng.llm.ahead.in_step
    for got, want in zip(outs, alone):
        _same(got, want, tol=1e-4)
    _same(clip, clip_alone, tol=1e-4)
    assert not eng.llm.ahead.pending and not eng.llm.ahead.inflight and not eng.llm.runner._cache_holds


@pytest.mark.parametrize("options", [{"vision_slice_rows": 1}, {"encode_ahead": True}])  # sliced, side stream
def test_media_that_cannot_be_encoded_fail_their_request_alone(tiny_model_dir, monkeypatch, options):
    alone = [_engine(tiny_model_dir).generate([c], STREAM, return_logits=True)[0] for c in TEXTS]
    eng = _engine(tiny_model_dir, **options)
    free = eng.llm.blocks.num_free
    model = eng.llm.model

    def broken(*args, **kwargs):
        raise RuntimeError("injected: this clip cannot be encoded")
        yield  # a generator, as encode_media_steps is

    monkeypatch.setattr(model, "encode_media_steps", broken)
    monkeypatch.setattr(model, "encode_media", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("injected: this clip cannot be encoded")))
    outs, err = _streams_then_clip(eng, expect_error=True)
    assert "cannot be encoded" in str(err)
    for got, want in zip(outs, alone):
        _same(got, want, tol=1e-4)
    assert eng.llm.blocks.num_free == free and eng.llm.ahead.failures >= 1
    assert not eng.llm.ahead.in_step  # forgotten once the request ended
    assert not eng.llm.ahead.pending and not eng.llm.ahead.inflight and not eng.llm.runner._cache_holds


def test_a_sliced_forward_keeps_no_pixels_after_its_patch_embedding(tiny_model_dir):
    """Between steps the generator holds the hidden state, not the (P, 1176) pixels (the largest
    input of a long clip)."""
    import gc
    import weakref

    import torch

    eng = _engine(tiny_model_dir)
    [item] = eng.load_media(CLIP_CONV)
    with torch.inference_mode():
        pixels = eng.llm.model.prepare_pixels(item.pixel_values, torch.float32)
        ref = weakref.ref(pixels)
        gen = eng.llm.model.encode_media_steps(pixels, [item.grid_thw], "video")
        del pixels
        run_steps(gen, 2)  # the embedding and one block
        gc.collect()
        assert ref() is None
        drain(gen)
