"""Overlapped decode (llm_engine.step): a greedy decode batch is launched before the tokens of
the batch before it are read. Run here through the row-batch path without capture (how the
CPU tests check the CUDA-graph path); it must give exactly the tokens of step-by-step decode,
also when requests stop on a token, reach their length at different steps, are aborted
mid-answer or keep their KV in a session, and must leave no block behind."""

import pytest

from omnistream import Engine, SamplingParams
from omnistream.layers.paged_decode import torch_paged_decode


def _engine(model_dir, overlap: bool) -> Engine:
    eng = Engine.from_pretrained(model_dir, device="cpu", kv_cache_tokens=8192, block_size=16, overlap_decode=overlap)
    eng.llm.runner.set_row_backend(torch_paged_decode)
    eng.llm.runner.enable_cuda_graphs(max_context=4096, use_graphs=False)
    return eng


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    on, off = _engine(tiny_model_dir, True), _engine(tiny_model_dir, False)
    yield on, off
    on.close()
    off.close()


def _convs(n: int) -> list:
    return [[{"role": "user", "content": f"Client {i} asks: " + " ".join(f"w{i}x{k}" for k in range(3 + 2 * i))}] for i in range(n)]


def _free(eng: Engine) -> bool:
    s = eng.stats()
    return s["kv_blocks_free"] == s["kv_blocks_total"] and s["requests_running"] == 0


def test_same_tokens_as_step_by_step_with_lengths_and_stop_tokens(engines):
    on, off = engines
    convs = _convs(8)
    lengths = [1, 2, 5, 9, 17, 3, 12, 24]
    plain = [off.generate(c, SamplingParams(max_new_tokens=n, ignore_eos=True))[0].token_ids for c, n in zip(convs, lengths)]
    # a stop token taken from the middle of some answers: those requests end early, at
    # different steps, while the batch after their last token is already launched
    sampling = []
    for ids, n in zip(plain, lengths):
        stop = (ids[n // 2],) if n >= 5 else ()
        sampling.append(SamplingParams(max_new_tokens=n, stop_token_ids=stop) if stop else SamplingParams(max_new_tokens=n, ignore_eos=True))
    expected = [r.token_ids for r in off.run([off.request_for(c, sp) for c, sp in zip(convs, sampling)])]
    before = on.stats()["engine"]["overlapped_steps"]
    got = on.run([on.request_for(c, sp) for c, sp in zip(convs, sampling)])
    assert [r.token_ids for r in got] == expected
    assert any(len(e) < n for e, n in zip(expected, lengths)), "no request stopped on its stop token"
    assert [r.finish_reason for r in got] == [r.finish_reason for r in off.run([off.request_for(c, sp) for c, sp in zip(convs, sampling)])]
    assert "stop" in [r.finish_reason for r in got]
    assert on.stats()["engine"]["overlapped_steps"] - before >= 10, "the decode steps were not overlapped"
    assert _free(on)


def test_streaming_and_abort_mid_answer(engines):
    on, off = engines
    [conv] = _convs(1)
    sp = SamplingParams(max_new_tokens=40, ignore_eos=True)
    expected = off.generate(conv, sp)[0]
    h = on.submit(on.request_for(conv, sp))
    text = "".join(d.text for d in h)
    assert text == expected.text and h.result().token_ids == expected.token_ids
    h = on.submit(on.request_for(conv, sp))
    for i, _ in enumerate(h):
        if i == 5:
            h.abort()
    assert h.result().finish_reason == "abort"
    assert _free(on)


def test_sessions_keep_exact_kv(engines):
    on, off = engines
    answers = []
    for eng in (on, off):
        s = eng.session(system="You answer briefly.")
        sp = SamplingParams(max_new_tokens=7, ignore_eos=True)
        answers.append([s.ask(q, sp).token_ids for q in ("first question here", "and a second one", "third")])
        s.close()
    assert answers[0] == answers[1]
    assert _free(on)


def test_sampled_and_logit_requests_run_step_by_step_beside_greedy_ones(engines):
    on, off = engines
    convs = _convs(4)
    specs = lambda eng: [eng.request_for(convs[0], SamplingParams(max_new_tokens=6, ignore_eos=True)),  # noqa: E731
                         eng.request_for(convs[1], SamplingParams(max_new_tokens=6, temperature=0.8, seed=3, ignore_eos=True)),
                         eng.request_for(convs[2], SamplingParams(max_new_tokens=6, ignore_eos=True), return_logits=True),
                         eng.request_for(convs[3], SamplingParams(max_new_tokens=6, ignore_eos=True), logprobs=2)]
    a, b = on.run(specs(on)), off.run(specs(off))
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert all((x - y).abs().max() < 1e-5 for x, y in zip(a[2].logits, b[2].logits))
    assert [lp for lp, _ in a[3].logprobs] == pytest.approx([lp for lp, _ in b[3].logprobs], abs=1e-5)
    assert _free(on)
