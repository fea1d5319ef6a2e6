"""`omnistream bench repeat` (experiment E4): the same request twice.

One video question (the clip + one question) is sent twice to each system:
  transformers         from scratch both times (no cache survives a `generate` call)
  omnistream generate  Engine.generate twice: the second finds the clip's vision embeddings in
                       the encoder cache and the prompt's KV blocks in the prefix cache
  omnistream session   a fresh session (add_video + ask) twice, on another clip so that its
                       first request is as cold as the first generate
Reported: each request's TTFT (preprocessing excluded), vision tokens encoded, prompt tokens
served from the prefix cache, and the first/second TTFT ratio. Warm-up on a third clip first.
"""

from __future__ import annotations

from omnistream.bench.latency import MemoryMeter, environment
from omnistream.bench.models import resolve_dtype
from omnistream.bench.multiturn import (
    TURN_TEXT_TOKENS, VisionProbe, add_clip, build_systems, cuda_device, engine_ask, engine_row, fmt, hf_turn,
    model_arg, print_cache_stats, print_header, ratio, session_engine_options, times, warm_up, write_json,
)
from omnistream.bench.workload import DEFAULT_QUESTION, video_question, video_tokens
from omnistream.engine.sampling import SamplingParams

SYSTEMS = ("transformers", "omnistream_generate", "omnistream_session")
SESSION_SEED_OFFSET = 1  # the session route's clip: seed + 1


def engine_generate(engine, messages: list[dict], sampling: SamplingParams, probe: VisionProbe) -> dict:
    probe.take()
    before = engine.stats()["vision_tokens_encoded"]
    [res] = engine.generate([messages], sampling)
    return engine_row(engine, res, before, probe, ttft_has_media=True)


def engine_fresh_session(engine, frames: int, size: int, seed: int, sampling: SamplingParams, probe: VisionProbe) -> dict:
    session = engine.session()
    try:
        ingest = add_clip(session, frames, size, seed)
        return engine_ask(engine, session, DEFAULT_QUESTION, sampling, probe, MemoryMeter(engine.device, 0)) | {"add_video_s": ingest}
    finally:
        session.close()


def twice(fn) -> list[dict]:
    return [fn(), fn()]


def run_repeat(model, device: str, dtype: str, frames: int, size: int, new_tokens: int, seed: int = 0) -> dict:
    dev = cuda_device(device)
    tdtype = resolve_dtype(dtype, str(dev))
    context = video_tokens(frames, size) + new_tokens + TURN_TEXT_TOKENS
    options = session_engine_options(model, frames, size, tdtype, 4 * context + 1024)
    hf, engine, _ = build_systems(model, dev, tdtype, seed, options, with_hf=True)
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    warm_up(engine, hf, frames, size, seed, sampling)
    messages = video_question(frames, size, seed)
    hf_probe, probe = VisionProbe(hf.model.visual, dev), VisionProbe(engine.model.visual, dev)
    try:
        systems = {
            "transformers": twice(lambda: hf_turn(hf, engine, messages, new_tokens, hf_probe)),
            "omnistream_generate": twice(lambda: engine_generate(engine, messages, sampling, probe)),
            "omnistream_session": twice(lambda: engine_fresh_session(engine, frames, size, seed + SESSION_SEED_OFFSET, sampling, probe)),
        }
    finally:
        hf_probe.remove()
        probe.remove()
    return {
        "env": environment(dev, tdtype),
        "workload": {"model": str(model), "frames": frames, "size": size, "fps": 2.0, "new_tokens": new_tokens, "seed": seed,
                     "video_tokens": video_tokens(frames, size), "engine_options": options},
        "systems": systems,
        "first_over_second_ttft": {k: ratio(v[0]["ttft_s"], v[1]["ttft_s"]) for k, v in systems.items()},
        "engine_stats": engine.stats(),
    }


def print_repeat(r: dict, out=None) -> None:
    print_header("repeat", r, out)
    print(f"{'system':<22}{'TTFT 1 ms':>11}{'TTFT 2 ms':>11}{'1st/2nd':>9}{'vision tok 1/2':>16}{'cached 2nd':>12}", file=out)
    for name in SYSTEMS:
        a, b = r["systems"][name]
        cached = b.get("cached_tokens")
        print(f"{name:<22}{fmt(a['ttft_s'], 1000):>11}{fmt(b['ttft_s'], 1000):>11}{fmt(r['first_over_second_ttft'][name], digits=2):>9}"
              f"{str(a['vision_tokens_encoded']) + '/' + str(b['vision_tokens_encoded']):>16}{'-' if cached is None else cached:>12}", file=out)
    base, gen = r["systems"]["transformers"][1], r["systems"]["omnistream_generate"][1]
    print(f"second request TTFT: transformers {fmt(base['ttft_s'], 1000)} ms, omnistream {fmt(gen['ttft_s'], 1000)} ms "
          f"({times(ratio(base['ttft_s'], gen['ttft_s']))})", file=out)
    print_cache_stats(r["engine_stats"], out)


def cmd_repeat(args) -> int:
    from omnistream.entrypoints.options import default_device

    report = run_repeat(model_arg(args), default_device(args.device), args.dtype, args.frames, args.size, args.new_tokens, args.seed)
    print_repeat(report)
    write_json(report, args.json)
    return 0
