"""`omnistream bench shared` (W2): N sessions on one clip, one after another.

Each session adds the same clip and asks its own question (session 1 cold, then 2..N). The
sessions stay open until the end, as concurrent users' sessions would.
  omnistream    session i finds the clip's KV blocks in the prefix cache (and any vision
                embeddings it still needs in the encoder cache): vision tokens encoded must be 0
                for sessions 2..N, and only the question's tokens are prefilled
  transformers  every session recomputes everything (preprocessing, vision, prefill)
Per session: TTFT of both, vision calls and tokens of both, the engine's prefix-cache hit
tokens and add_video time (media decode + resize + hash: each session hashes its own copy).
"""

from __future__ import annotations

from omnistream.bench.latency import MemoryMeter, environment, median
from omnistream.bench.models import resolve_dtype
from omnistream.bench.multiturn import (
    TURN_TEXT_TOKENS, VisionProbe, add_clip, build_systems, cuda_device, engine_ask, fmt, hf_turn, model_arg,
    print_cache_stats, print_header, print_turns, question, ratio, session_engine_options, times, warm_up, write_json,
)
from omnistream.bench.workload import video_question, video_tokens
from omnistream.engine.sampling import SamplingParams


def engine_sessions(engine, frames: int, size: int, seed: int, n: int, sampling: SamplingParams, meter: MemoryMeter) -> tuple[list[dict], list[tuple]]:
    """n sessions on the clip of `seed`, session i asking question i -> (one row per session,
    each session's exact prompt for the baseline)."""
    probe = VisionProbe(engine.model.visual, engine.device)
    sessions, rows, exacts = [], [], []
    try:
        for i in range(n):
            sessions.append(engine.session())
            ingest = add_clip(sessions[-1], frames, size, seed)
            hits_before = engine.stats()["prefix_cache"]["hit_tokens"]
            exacts.append(sessions[-1].prompt_for(question(i)))
            row = engine_ask(engine, sessions[-1], question(i), sampling, probe, meter)
            rows.append(row | {"add_video_s": ingest, "prefix_hit_tokens": engine.stats()["prefix_cache"]["hit_tokens"] - hits_before})
    finally:
        for s in sessions:
            s.close()
        probe.remove()
    return rows, exacts


def hf_sessions(hf, engine, frames: int, size: int, seed: int, exacts: list[tuple], new_tokens: int) -> list[dict]:
    probe = VisionProbe(hf.model.visual, next(hf.parameters()).device)
    try:
        return [hf_turn(hf, engine, video_question(frames, size, seed, question(i)), new_tokens, probe, exact)
                for i, exact in enumerate(exacts)]
    finally:
        probe.remove()


def run_shared(model, device: str, dtype: str, frames: int, size: int, sessions: int, new_tokens: int, seed: int = 0) -> dict:
    dev = cuda_device(device)
    tdtype = resolve_dtype(dtype, str(dev))
    context = video_tokens(frames, size) + new_tokens + TURN_TEXT_TOKENS
    # the clip's blocks are shared; each session holds its own tail (and the warm-up's clip)
    options = session_engine_options(model, frames, size, tdtype, 3 * context + sessions * (new_tokens + TURN_TEXT_TOKENS) + 1024)
    hf, engine, resident = build_systems(model, dev, tdtype, seed, options, with_hf=True)
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    meter = MemoryMeter(dev, resident)
    warm_up(engine, hf, frames, size, seed, sampling, meter)
    ours, exacts = engine_sessions(engine, frames, size, seed, sessions, sampling, meter)
    base = hf_sessions(hf, engine, frames, size, seed, exacts, new_tokens)
    peaks = [r["peak_bytes"] for r in ours if r["peak_bytes"] is not None]
    return {
        "env": environment(dev, tdtype),
        "workload": {"model": str(model), "frames": frames, "size": size, "fps": 2.0, "sessions": sessions, "new_tokens": new_tokens,
                     "seed": seed, "video_tokens": video_tokens(frames, size), "engine_options": options},
        "omnistream": {"sessions": ours},
        "transformers": {"sessions": base},
        "summary": {
            "omnistream_later_ttft_s": median([r["ttft_s"] for r in ours[1:]]),
            "transformers_later_ttft_s": median([r["ttft_s"] for r in base[1:]]),
            "omnistream_later_vision_tokens": sum(r["vision_tokens_encoded"] for r in ours[1:]),
            "omnistream_later_prefix_hit_tokens": sum(r["prefix_hit_tokens"] for r in ours[1:]),
            "engine_peak_gib": max(peaks) / 2**30 if peaks else None,
            "equal_greedy_tokens_per_session": [sum(x == y for x, y in zip(a["tokens"], b["tokens"])) for a, b in zip(base, ours)],
        },
        "engine_stats": engine.stats(),
    }


def print_shared(r: dict, out=None) -> None:
    print_header("shared", r, out)
    ours, base, s = r["omnistream"]["sessions"], r["transformers"]["sessions"], r["summary"]
    print_turns(ours, base, label="session", out=out)
    n = len(ours)
    print(f"sessions 2..{n}: median TTFT transformers {fmt(s['transformers_later_ttft_s'], 1000)} ms, omnistream "
          f"{fmt(s['omnistream_later_ttft_s'], 1000)} ms ({times(ratio(s['transformers_later_ttft_s'], s['omnistream_later_ttft_s']))}); "
          f"omnistream vision tokens encoded {s['omnistream_later_vision_tokens']}, prefix-cache hit tokens {s['omnistream_later_prefix_hit_tokens']}", file=out)
    print("add_video ms per session: " + " ".join(fmt(x["add_video_s"], 1000) for x in ours)
          + f"; engine peak memory {fmt(s['engine_peak_gib'], digits=2)} GiB", file=out)
    print_cache_stats(r["engine_stats"], out)


def cmd_shared(args) -> int:
    from omnistream.entrypoints.options import default_device

    report = run_shared(model_arg(args), default_device(args.device), args.dtype, args.frames, args.size, args.sessions, args.new_tokens, args.seed)
    print_shared(report)
    write_json(report, args.json)
    return 0
