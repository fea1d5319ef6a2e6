"""bench concurrency's encoder interference: M text streams decode; once each has k tokens, one
client asks about a long clip; the streams' inter-token latency while the clip is encoded and
prefilled (its arrival to its first token) against the same streams without the clip.

    r = run_interference(engine, 16, 128, 64, 448, 256, 64, seed)   # r["itl_p99_ratio"]
"""

from __future__ import annotations

import threading
from typing import Any

from omnistream.bench.multiturn import add_clip, question
from omnistream.bench.stats import pct, ratio
from omnistream.bench.text_prompts import SYSTEM, context_prompt
from omnistream.bench.workload import video_tokens
from omnistream.engine.sampling import SamplingParams

SEED_INTERFERENCE = 200_000


def _stream_client(engine, messages: list[dict], sampling: SamplingParams, ready, go, started: threading.Event, k: int, out: dict) -> None:
    try:
        ready.wait()
        go.wait()
        handle = engine.submit(engine.request_for(messages, sampling))
        seen = 0
        for delta in handle:  # the client reads its answer as it streams
            seen += len(delta.token_ids)
            if seen >= k:
                started.set()
        out["result"] = handle.result()
    except threading.BrokenBarrierError:
        pass
    except Exception as e:  # noqa: BLE001
        out["error"] = e
        ready.abort()
    finally:
        started.set()


def _clip_client(engine, frames: int, size: int, seed: int, sampling: SamplingParams, ready, go, streams: list[threading.Event], out: dict) -> None:
    try:
        s = engine.session(system=SYSTEM)
        out["session"] = s
        out["add_video_s"] = add_clip(s, frames, size, seed)
        ready.wait()
        go.wait()
        for e in streams:  # the clip arrives in the streams' steady decode
            e.wait()
        out["result"] = s.ask(question(0), sampling)
    except threading.BrokenBarrierError:
        pass
    except Exception as e:  # noqa: BLE001
        out["error"] = e
        ready.abort()


def itl_in_window(results, lo: float, hi: float) -> list[float]:
    """Intervals between consecutive tokens of the results whose later token came in (lo, hi]."""
    out = []
    for r in results:
        t = r.metrics.token_times
        out += [b - a for a, b in zip(t, t[1:]) if lo < b <= hi]
    return out


def run_interference_once(engine, m: int, tokens: int, frames: int, size: int, context_tokens: int, new_tokens: int, seed: int, with_clip: bool) -> dict:
    sampling = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    k = max(2, tokens // 8)
    prompts = [[{"role": "system", "content": SYSTEM},
                {"role": "user", "content": context_prompt(engine.tokenizer, context_tokens, seed + i).replace("Reply with OK.", "Write a long story about them.")}]
               for i in range(m)]
    ready, go = threading.Barrier(m + 1 + int(with_clip)), threading.Event()
    started = [threading.Event() for _ in range(m)]
    outs: list[dict[str, Any]] = [{} for _ in range(m)]
    clip_out: dict[str, Any] = {}
    threads = [threading.Thread(target=_stream_client, args=(engine, p, sampling, ready, go, e, k, o), daemon=True)
               for p, e, o in zip(prompts, started, outs)]
    if with_clip:
        threads.append(threading.Thread(target=_clip_client, daemon=True, args=(
            engine, frames, size, seed + m, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True), ready, go, started, clip_out)))
    for t in threads:
        t.start()
    try:
        try:
            ready.wait()
        except threading.BrokenBarrierError:
            pass
        go.set()
        for t in threads:
            t.join()
    finally:
        if "session" in clip_out:
            clip_out["session"].close()
    errors = [o["error"] for o in outs + [clip_out] if "error" in o]
    if errors:
        raise errors[0]
    results = [o["result"] for o in outs]
    steady_from = max(r.metrics.token_times[k - 1] for r in results)
    first_end = min(r.metrics.finished_at for r in results)
    row: dict[str, Any] = {"text_clients": m, "text_tokens": tokens, "stream_tokens_before_clip": k,
                           "text_ttft_p50_s": pct([r.metrics.ttft_s for r in results], 50)}
    if with_clip:
        cm = clip_out["result"].metrics
        lo, hi = cm.arrival, cm.first_token_at
        window = itl_in_window(results, lo, hi)
        outside = itl_in_window(results, steady_from, lo) + itl_in_window(results, hi, first_end)
        row |= {
            "clip": {"frames": frames, "size": size, "video_tokens": video_tokens(frames, size), "ttft_s": cm.ttft_s,
                     "vision_encode_s": cm.vision_encode_s, "prefill_s": cm.prefill_s, "add_video_s": clip_out["add_video_s"],
                     "arrival_offset_s": lo - steady_from},
            "window_s": hi - lo,
            "itl_window": window, "itl_window_p50_s": pct(window, 50), "itl_window_p99_s": pct(window, 99),
            "itl_outside_window_p50_s": pct(outside, 50), "itl_outside_window_p99_s": pct(outside, 99),
            "streams_running_at_clip_first_token": sum(r.metrics.finished_at >= hi for r in results),
        }
    else:
        steady = itl_in_window(results, steady_from, first_end)
        row |= {"itl_steady": steady, "itl_steady_p50_s": pct(steady, 50), "itl_steady_p99_s": pct(steady, 99)}
    return row


def run_interference(engine, m: int, tokens: int, frames: int, size: int, context_tokens: int, new_tokens: int, seed: int) -> dict:
    base = seed + SEED_INTERFERENCE
    # warm-up: the clip path (vision at this size, the long prefill) and the streams
    run_interference_once(engine, min(m, 2), min(tokens, 16), frames, size, context_tokens, new_tokens, base + 90_000, with_clip=True)
    without = run_interference_once(engine, m, tokens, frames, size, context_tokens, new_tokens, base, with_clip=False)
    with_clip = run_interference_once(engine, m, tokens, frames, size, context_tokens, new_tokens, base + 10_000, with_clip=True)
    return {
        "without_clip": without, "with_clip": with_clip,
        "itl_p99_ratio": ratio(with_clip["itl_window_p99_s"], without["itl_steady_p99_s"]),
        "itl_p50_ratio": ratio(with_clip["itl_window_p50_s"], without["itl_steady_p50_s"]),
    }
