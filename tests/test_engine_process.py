"""The engine core in its own process (engine_process=True: engine/core_process.py and
engine/remote_core.py) against the same engine in a thread.

Checked: concurrent requests with images and videos give the same greedy tokens and logits;
streamed deltas concatenate to the text; requests are built (and refused) in the caller's
process exactly as the engine builds them; abort frees the blocks; sessions (cached follow-ups,
fork) and live sessions (both KV policies: policy fast edits KV through named operations) work;
a killed engine process fails what is in flight with an EngineError and nothing hangs; close()
and the parent's death leave no process and no tensor file behind. The wire's tensor encoding
is checked on its own.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from multiprocessing.connection import Pipe

import numpy as np
import pytest
import torch

from omnistream import Engine, SamplingParams
from omnistream.engine.protocol import EngineRequest
from omnistream.engine.wire import SHM_MIN_BYTES, Wire
from omnistream.errors import BudgetError, ConfigError, EngineError, UserInputError

GREEDY = SamplingParams(max_new_tokens=6, ignore_eos=True)
OPTS = dict(device="cpu", block_size=16, kv_cache_tokens=8192, encoder_cache_bytes=8 << 20)


def _frames(n: int, side: int, seed: int) -> list[np.ndarray]:
    base = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    return [np.roll(base, 5 * i, axis=1) for i in range(n)]


def _video(n: int, side: int, seed: int) -> dict:
    return {"type": "video", "video": {"frames": _frames(n, side, seed), "timestamps": [i / 2 for i in range(n)]},
            "max_pixels": side * side}


def _image(side: int, seed: int) -> dict:
    return {"type": "image", "image": np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)}


def _conversations() -> list[list[dict]]:
    """Text, an image, a video whose rows go through shared memory (8 frames of 112x112: 300 KB)
    and a small one inline, and an image with a video."""
    return [
        [{"role": "user", "content": "Say something about the weather."}],
        [{"role": "user", "content": [_image(84, 1), {"type": "text", "text": "What is in the picture?"}]}],
        [{"role": "user", "content": [_video(8, 112, 2), {"type": "text", "text": "What happens?"}]}],
        [{"role": "user", "content": [_video(2, 56, 3), {"type": "text", "text": "And here?"}]}],
        [{"role": "user", "content": [_image(56, 4), _video(4, 56, 5), {"type": "text", "text": "Compare them."}]}],
    ]


@pytest.fixture(scope="module")
def in_thread(tiny_model_dir):
    with Engine.from_pretrained(tiny_model_dir, **OPTS) as eng:
        yield eng


@pytest.fixture(scope="module")
def remote(tiny_model_dir):
    with Engine.from_pretrained(tiny_model_dir, engine_process=True, **OPTS) as eng:
        yield eng


def _child_pid(eng: Engine) -> int:
    return eng.core.process.pid


def _gone(pid: int) -> bool:
    """No such process, or a zombie nobody reaped yet (it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return True


def _shm_files(eng: Engine) -> list[str]:
    return glob.glob(f"/dev/shm/{eng.core._prefix}-*")


# ------------------------------------------------------------------------------ exactness
def test_concurrent_media_requests_equal_the_in_thread_engine(in_thread, remote):
    convs = _conversations()
    want = [in_thread.generate(c, GREEDY, return_logits=True)[0] for c in convs]  # each alone
    got = remote.generate(convs, GREEDY, return_logits=True)  # all at once: they share steps
    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids and g.text == w.text
        assert len(g.logits) == len(w.logits)
        for a, b in zip(g.logits, w.logits):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        assert g.metrics.prompt_tokens == w.metrics.prompt_tokens and g.metrics.media_tokens == w.metrics.media_tokens
        assert g.metrics.ttft_s is not None and g.metrics.ttft_s > 0  # one clock on both sides (perf_counter)
    assert remote.stats()["vision_tokens_encoded"] > 0
    assert not _shm_files(remote)  # every tensor file was mapped and unlinked by its receiver


def test_requests_are_built_here_as_the_engine_builds_them(in_thread, remote):
    spec = in_thread.request_for(_conversations()[2], GREEDY)
    a, b = in_thread.llm.make_request(spec), remote.core.factory.make_request(spec)
    assert torch.equal(a.positions, b.positions) and a.next_pos == b.next_pos
    assert a.block_hashes == b.block_hashes and a.stop_ids == b.stop_ids
    assert remote.kv_pool_tokens == in_thread.kv_pool_tokens and remote.max_context == in_thread.max_context


def test_streamed_deltas_concatenate_to_the_text(remote):
    h = remote.submit(remote.request_for([{"role": "user", "content": "Tell a story."}], SamplingParams(max_new_tokens=24, ignore_eos=True)))
    deltas = list(h)
    out = h.result()
    assert "".join(d.text for d in deltas) == out.text
    assert [t for d in deltas for t in d.token_ids] == out.token_ids and len(out.token_ids) == 24


def test_a_prepared_request_never_sent_leaves_nothing_behind(remote):
    """Engine.prepare() without send(): the engine process's core keeps no handle for it (it
    was registered at prepare and stayed there for good); one sent is answered and let go."""
    spec = remote.request_for([{"role": "user", "content": "never sent"}], GREEDY)
    for _ in range(5):
        remote.prepare(spec)
    assert remote.core._handles == {}  # noqa: SLF001
    sent = remote.send(remote.prepare(spec))
    assert sent.result().token_ids and remote.core._handles == {}  # noqa: SLF001


def test_submit_refuses_at_once_what_can_never_run(remote):
    with pytest.raises(BudgetError):
        remote.submit(EngineRequest([1, 2, 3], sampling=SamplingParams(max_new_tokens=100_000)))
    with pytest.raises(UserInputError, match="empty prompt"):
        remote.submit(EngineRequest([]))
    assert remote.generate([{"role": "user", "content": "still fine"}], GREEDY)[0].token_ids


def test_a_request_failing_in_the_engine_fails_alone(remote):
    import dataclasses

    bad = remote.request_for(_conversations()[1], GREEDY)
    off, item = bad.media[0]
    # rows of the wrong width: the vision tower raises inside the engine process
    bad.media = [(off, dataclasses.replace(item, pixel_values=item.pixel_values[:, :7].contiguous(), content_hash="bad",
                                           patch_hashes=["bad"]))]
    good = remote.request_for(_conversations()[0], GREEDY)
    hb, hg = remote.submit(bad), remote.submit(good)
    with pytest.raises(EngineError, match="failed in the engine"):
        hb.result(60)
    assert hg.result(60).token_ids == remote.generate(_conversations()[0], GREEDY)[0].token_ids


def test_abort_frees_every_block(remote):
    total = remote.stats()["kv_blocks_total"]
    h = remote.submit(remote.request_for([{"role": "user", "content": "Go on forever."}],
                                         SamplingParams(max_new_tokens=2000, ignore_eos=True)))
    next(iter(h))  # it runs
    h.abort()
    assert h.result(30).finish_reason == "abort"
    assert remote.core.run_op("stats")["kv_blocks_free"] == total


def test_unknown_operation_and_call_are_refused_clearly(remote):
    with pytest.raises(ValueError, match="unknown engine operation"):
        remote.core.run_op("no_such_op")
    with pytest.raises(EngineError, match="run_op"):
        remote.core.call(lambda llm: None)
    assert remote.core.run_op("noop") is None and remote.llm is None


def test_every_operation_runs_in_both_cores(in_thread, remote):
    from omnistream.engine.ops import OPS

    covered = {"noop", "retained_tokens", "retained_blocks", "fork_retained", "release_retained", "owned_blocks",
               "release_owned", "ensure_encoder_cache", "discard_encoder_entries", "stats",
               "open_gap", "close_gap"}  # the last two: by the live session of policy fast below
    assert set(OPS) == covered, "a new operation needs a line here"
    for eng in (in_thread, remote):
        core = eng.core
        assert core.run_op("noop") is None
        assert core.run_op("retained_tokens", "nobody") == 0 and core.run_op("retained_blocks", "nobody") == []
        core.run_op("fork_retained", "nobody", "nobody-2")
        core.post_op("release_retained", "nobody-2")  # no wait; ordered before the next call
        assert core.run_op("owned_blocks", "nobody") == [] and core.run_op("release_owned", "nobody") is None
        assert core.run_op("ensure_encoder_cache", 1 << 20) is False  # OPTS configures one
        core.run_op("discard_encoder_entries", ["no-such-key"])
        stats = core.run_op("stats")
        assert stats["kv_blocks_retained"] == 0 and stats["kv_blocks_free"] == stats["kv_blocks_total"]
    with pytest.raises(BudgetError):  # an operation's error reaches the caller as itself
        remote.core.run_op("open_gap", "nobody", 0, 10**9, 0)
    remote.core.run_op("release_owned", "nobody")


def test_load_counts_what_waits(remote):
    load = remote.core.load()
    assert load.waiting == 0 and load.running == 0 and load.kv_blocks_free == remote.stats()["kv_blocks_total"]


# ------------------------------------------------------------------------------ sessions
def test_session_follow_up_is_served_from_the_cache(in_thread, remote):
    answers = []
    for eng in (in_thread, remote):
        s = eng.session(system="You answer briefly.")
        s.add_video({"frames": _frames(4, 56, 7), "timestamps": [0.0, 0.5, 1.0, 1.5]}, max_pixels=56 * 56)
        first = s.ask("What happens?", GREEDY)
        second = s.ask("And then?", GREEDY)
        assert second.metrics.cached_tokens >= first.metrics.prompt_tokens - eng.block_size
        assert s.pinned_tokens > 0 and s.retained_blocks()
        fork = s.fork()
        assert fork.retained_blocks() == s.retained_blocks()
        third = fork.ask("Why?", GREEDY)
        answers.append((first.token_ids, second.token_ids, third.token_ids))
        fork.close()
        s.close()
    assert answers[0] == answers[1]
    stats = remote.stats()
    assert stats["kv_blocks_retained"] == 0 and stats["sessions"] == 0


@pytest.mark.parametrize("policy", ["exact", "fast"])
def test_live_session_answers_as_in_thread(in_thread, remote, policy):
    got = []
    for eng in (in_thread, remote):
        # frames are encoded by the questions (no prefill on arrival): frames_encoded is exact
        live = eng.live_session(max_pixels=56 * 56, policy=policy, prefill_on_arrival=False)
        frames = _frames(7, 64, 9 if policy == "exact" else 10)  # not in the encoder cache yet
        live.add_frames(frames[:4], [0.0, 0.5, 1.0, 1.5])
        a = live.ask("What just happened?", GREEDY)
        live.add_frames(frames[4:], [2.0, 2.5, 3.0])  # an odd frame: padded into the answer
        b = live.ask("And now?", GREEDY)
        metrics = [(m.frames_encoded, m.frames_in_context, m.visual_tokens, m.kv_cache_length) for m in (a.live, b.live)]
        got.append((a.token_ids, b.token_ids, metrics))
        live.close()
    assert got[0] == got[1] and got[1][2][1][0] > 0
    stats = remote.stats()
    assert stats["kv_blocks_owned"] == 0 and stats["kv_blocks_retained"] == 0


# ------------------------------------------------------------------------------ faults and lifetime
def test_killed_engine_process_fails_requests_and_nothing_hangs(tiny_model_dir):
    eng = Engine.from_pretrained(tiny_model_dir, engine_process=True, **OPTS)
    pid = _child_pid(eng)
    long = SamplingParams(max_new_tokens=4000, ignore_eos=True)
    handles = [eng.submit(eng.request_for([{"role": "user", "content": f"Count {i}."}], long)) for i in range(3)]
    next(iter(handles[0]))  # running
    errors: list[BaseException] = []

    def reader(h):
        try:
            for _ in h:
                pass
        except EngineError as e:
            errors.append(e)

    readers = [threading.Thread(target=reader, args=(h,)) for h in handles]
    for t in readers:
        t.start()
    os.kill(pid, signal.SIGKILL)
    for t in readers:
        t.join(30)
    assert not any(t.is_alive() for t in readers) and len(errors) == 3
    assert all("engine process died" in str(e) for e in errors)
    with pytest.raises(EngineError, match="died"):
        eng.core.run_op("noop", timeout=5)
    with pytest.raises(EngineError, match="died"):
        eng.generate([{"role": "user", "content": "hi"}], GREEDY)
    assert not eng.core.alive
    t0 = time.monotonic()
    eng.close()
    assert time.monotonic() - t0 < 10 and _gone(pid) and not _shm_files(eng)


def test_health_reports_a_dead_engine_process(tiny_model_dir):
    from fastapi.testclient import TestClient

    from omnistream.server.app import build_app
    from omnistream.server.config import ServerConfig

    eng = Engine.from_pretrained(tiny_model_dir, engine_process=True, **OPTS)
    try:
        with TestClient(build_app(eng, ServerConfig())) as client:
            assert client.get("/health").status_code == 200
            os.kill(_child_pid(eng), signal.SIGKILL)
            deadline = time.monotonic() + 10
            while eng.core.alive and time.monotonic() < deadline:
                time.sleep(0.05)
            r = client.get("/health")
            assert r.status_code == 503 and r.json()["engine_alive"] is False
    finally:
        eng.close()


def test_close_leaves_no_process_and_fails_what_is_in_flight(tiny_model_dir):
    eng = Engine.from_pretrained(tiny_model_dir, engine_process=True, **OPTS)
    pid = _child_pid(eng)
    h = eng.submit(eng.request_for([{"role": "user", "content": "Long."}], SamplingParams(max_new_tokens=4000, ignore_eos=True)))
    next(iter(h))
    eng.close()
    with pytest.raises(EngineError, match="closed"):
        h.result(10)
    assert _gone(pid) and eng.core.process.returncode == 0 and not _shm_files(eng)
    with pytest.raises(EngineError, match="closed"):
        eng.generate([{"role": "user", "content": "hi"}])


def test_an_engine_nobody_references_stops_its_process(tiny_model_dir):
    import gc
    import weakref

    eng = Engine.from_pretrained(tiny_model_dir, engine_process=True, **OPTS)
    eng.generate([{"role": "user", "content": "hi"}], GREEDY)
    pid, ref, prefix = _child_pid(eng), weakref.ref(eng.core), eng.core._prefix
    def ours() -> int:  # this engine's reader and sender threads (the module's engines have theirs)
        return sum(t.name in ("omnistream-engine-in", "omnistream-engine-send") for t in threading.enumerate())

    before = ours()
    del eng
    gc.collect()
    assert ref() is None  # no thread holds the core
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pid) and not glob.glob(f"/dev/shm/{prefix}-*")
    deadline = time.monotonic() + 5
    while ours() > before - 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ours() == before - 2


def test_engine_process_exits_when_its_parent_dies(tiny_model_dir, tmp_path):
    script = textwrap.dedent(f"""
        import os, sys
        from omnistream import Engine
        eng = Engine.from_pretrained({str(tiny_model_dir)!r}, device="cpu", kv_cache_tokens=1024, engine_process=True)
        print(eng.core.process.pid, flush=True)
        os._exit(0)  # no close(), no atexit: as if killed
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pid)


def test_engine_process_needs_a_recipe(tiny_model_dir):
    from omnistream.config import EngineConfig
    from omnistream.engine.build import checkpoint_model
    from omnistream.models.tokenizer import Tokenizer

    cfg = EngineConfig.from_kwargs(str(tiny_model_dir), engine_process=True, kv_cache_tokens=1024)
    with pytest.raises(ConfigError, match="recipe"):
        Engine(cfg, tiny_model_dir, checkpoint_model(tiny_model_dir, cfg, "meta"), Tokenizer(tiny_model_dir))


def test_startup_errors_reach_the_caller(tiny_model_dir):
    with pytest.raises(BudgetError):  # raised in the engine process while sizing the pool
        Engine.from_pretrained(tiny_model_dir, engine_process=True, memory_budget_bytes=1 << 20)


# ------------------------------------------------------------------------------ the wire
@pytest.mark.parametrize("tensor", [
    torch.arange(12, dtype=torch.int64).reshape(3, 4),
    torch.randn(5, 7).to(torch.bfloat16),
    torch.tensor([True, False, True]),
    torch.empty(0, 3),
    torch.tensor(3.5),
    torch.randint(0, 255, (SHM_MIN_BYTES * 2,), dtype=torch.uint8).reshape(-1, 64)[:, ::2],  # a strided view, via shm
])
def test_wire_moves_tensors_exactly(tensor):
    a, b = Pipe()
    send, recv = Wire(a, f"omnistream-test-{os.getpid()}"), Wire(b, "unused")
    send.send({"t": tensor, "again": tensor})
    got = recv.recv()
    assert got["t"].dtype == tensor.dtype and got["t"].shape == tensor.shape and torch.equal(got["t"], tensor)
    assert got["again"] is got["t"]  # one tensor referenced twice travels once
    assert not glob.glob(f"/dev/shm/omnistream-test-{os.getpid()}-*")


@pytest.mark.parametrize("engine_process", [False, True])
def test_a_burst_counts_as_waiting_at_once(tiny_model_dir, engine_process):
    """load().waiting counts the requests sent but not yet taken by the loop, beyond the free
    sequence slots: a server's --max-queued-requests check sees a burst at once (the counters
    lagged a step: a burst of 100 went through a limit of 10, a fresh-clone trial). One slot,
    five long requests: four wait, whatever the loop has taken by the time of the read (the
    read may count one twice while the loop takes it)."""
    with Engine.from_pretrained(tiny_model_dir, engine_process=engine_process, max_num_seqs=1, **OPTS) as eng:
        sp = SamplingParams(max_new_tokens=400, ignore_eos=True)
        handles = [eng.submit(EngineRequest(list(range(20 + i)), [], sp)) for i in range(5)]
        waiting = eng.core.load().waiting
        for h in handles:
            h.abort()
        for h in handles:
            assert h.result(timeout=60).finish_reason in ("abort", "length")
        deadline = time.monotonic() + 30
        while eng.core.load().waiting and time.monotonic() < deadline:  # the child's report of the aborts
            time.sleep(0.05)
        idle = eng.core.load()
    assert 4 <= waiting <= 5, waiting
    assert idle.waiting == 0 and idle.running == 0, idle
