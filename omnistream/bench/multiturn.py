"""`omnistream bench multiturn` (W1; experiments E1, E2, E3): one clip, N questions in a row.

  omnistream    one session: add_video once, then ask() per turn (the KV stays between turns)
  transformers  every turn re-runs the whole conversation so far, as a stateless `generate`
                pipeline does: media preprocessing, vision encode, prefill of everything,
                greedy decode. It is fed the engine's conversation: session.messages for the
                preprocessing, and the exact token ids of the engine's prompt (its own answers
                included, Session.prompt_for), so both systems prefill the same tokens.

The engine runs its turns first, then transformers replays them. E2 evidence: forward hooks
count the calls of each system's vision tower (and time transformers' with CUDA events); the
engine also reports `vision_tokens_encoded` per turn. Both systems are warmed up on another
clip first. `--memory-budget-gib` runs the engine alone under that budget (transformers'
weights would share the card and count against it) and prints its peak next to the budget.

This module also holds the pieces the other session benchmarks (repeat.py, shared.py) share:
VisionProbe, hf_turn, engine_ask, session_engine_options, add_clip.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from omnistream.bench.latency import MemoryMeter, environment, hf_greedy, median, prepare, tensor_bytes
from omnistream.bench.models import is_preset, make_engine, make_pair, resolve_dtype
from omnistream.bench.profile import StageClock
from omnistream.bench.workload import video_question, video_tokens
from omnistream.engine.sampling import SamplingParams
from omnistream.models.hf_config import QwenVLConfig
from omnistream.models.mrope import mrope_positions
from omnistream.models.qwen2_5_vl_presets import preset_config

QUESTIONS = (
    "Describe what happens in this video, step by step.",
    "How many coloured squares can you see?",
    "Which square moves the fastest?",
    "What colour is the background in the top-left corner?",
    "Do any of the squares leave the frame and come back?",
    "In which direction does the largest square move?",
    "Does anything change in the background over time?",
    "What is in the centre of the frame at the end of the clip?",
    "Summarise the clip in one sentence.",
    "Was there any moment when two squares overlapped?",
)
WARMUP_SEED_OFFSET = 1000
TURN_TEXT_TOKENS = 64  # KV room per turn beyond its answer: question + template tokens


def question(i: int) -> str:
    """The i-th (0-based) question; past the fixed list they stay distinct."""
    q = QUESTIONS[i % len(QUESTIONS)]
    return q if i < len(QUESTIONS) else f"{q} (question {i + 1})"


# ---------------------------------------------------------------------------------- probes
class VisionProbe:
    """Counts forward calls of a vision tower and the merged tokens they returned; times them
    with profile.StageClock (CUDA events on the GPU). `take()` returns the counts since the
    previous take. Works on transformers' tower (returns an output with pooler_output) and on
    ours (returns a tensor). A sliced encode (engine/encode_ahead.py: only while other answers
    decode, which these one-at-a-time benchmarks never have) runs the blocks without forward(),
    so no hook sees it; the engine's own vision_tokens_encoded and metrics do."""

    def __init__(self, visual: torch.nn.Module, device: torch.device) -> None:
        self.calls = self.tokens = 0
        self.clock = StageClock(device)
        self.clock.attach(visual, "vision")
        self.handle = visual.register_forward_hook(self._count)

    def _count(self, _mod, _args, out) -> None:
        rows = out if isinstance(out, torch.Tensor) else getattr(out, "pooler_output", None)
        self.calls += 1
        self.tokens += rows.shape[0] if isinstance(rows, torch.Tensor) else 0

    def take(self) -> dict:
        seconds = self.clock.totals().get("vision", 0.0)
        self.clock.spans.clear()
        out = {"vision_calls": self.calls, "vision_tokens": self.tokens, "vision_encode_s": seconds}
        self.calls = self.tokens = 0
        return out

    def remove(self) -> None:
        self.clock.remove()
        self.handle.remove()


# ---------------------------------------------------------------------------------- engine
def model_config(model: str | Path) -> QwenVLConfig:
    return preset_config(model) if is_preset(model) else QwenVLConfig.from_dir(Path(model))


def clip_embed_bytes(model: str | Path, frames: int, size: int, dtype: torch.dtype) -> int:
    """Bytes of one clip's vision embeddings (what the encoder cache holds for it)."""
    return video_tokens(frames, size) * model_config(model).vision.out_hidden_size * torch.finfo(dtype).bits // 8


def session_engine_options(model, frames: int, size: int, dtype: torch.dtype, context_tokens: int, budget_gib: float | None = None) -> dict:
    """Engine options of the session benchmarks: prefix caching on, an encoder cache for a few
    clips (the measured one and the warm-up one). Without a budget the KV pool is sized for
    `context_tokens` (the card also holds transformers); with one, the budget sizes it and the
    encoder cache holds about one clip."""
    clip = clip_embed_bytes(model, frames, size, dtype)
    if budget_gib is not None:
        return {"enable_prefix_caching": True, "memory_budget_bytes": int(budget_gib * 2**30), "encoder_cache_bytes": clip + clip // 4}
    return {"enable_prefix_caching": True, "kv_cache_tokens": context_tokens, "encoder_cache_bytes": max(4 * clip, 64 << 20)}


def add_clip(session, frames: int, size: int, seed: int) -> float:
    """Adds the benchmark clip of `seed` to a session -> seconds add_video took."""
    part = video_question(frames, size, seed)[0]["content"][0]
    t0 = time.perf_counter()
    session.add_video(part["video"], fps=part["fps"], min_pixels=part["min_pixels"], max_pixels=part["max_pixels"])
    return time.perf_counter() - t0


def engine_row(engine, res, vision_before: int, probe: VisionProbe, ttft_has_media: bool) -> dict:
    """One engine answer -> the row the reports print, TTFT without media preprocessing.
    ttft_has_media: the metrics' TTFT includes the media's decode and preprocessing (generate
    counts from the request's arrival; Session.ask from the question, media came at add_*)."""
    m = res.metrics
    tps = m.decode_tokens_per_s
    return {
        "ttft_s": m.ttft_s - (m.media_decode_s + m.preprocess_s if ttft_has_media else 0.0),
        "preprocess_s": m.media_decode_s + m.preprocess_s,
        "vision_encode_s": m.vision_encode_s,
        "prefill_s": m.prefill_s,
        "decode_ms_per_token": 1000 / tps if tps else None,
        "prompt_tokens": m.prompt_tokens,
        "cached_tokens": m.cached_tokens,
        "vision_tokens_encoded": engine.stats()["vision_tokens_encoded"] - vision_before,
        "vision_calls": probe.take()["vision_calls"],
        "tokens": res.token_ids,
    }


def engine_ask(engine, session, text: str, sampling: SamplingParams, probe: VisionProbe, meter: MemoryMeter) -> dict:
    """session.ask(text) -> engine_row + this ask's peak device memory (None on CPU)."""
    probe.take()
    before = engine.stats()["vision_tokens_encoded"]
    res, peak = meter.measure(lambda: session.ask(text, sampling))
    return engine_row(engine, res, before, probe, ttft_has_media=False) | {"peak_bytes": peak}


# ---------------------------------------------------------------------------- transformers
def hf_turn(hf, engine, messages: list[dict], new_tokens: int, probe: VisionProbe, exact: tuple | None = None) -> dict:
    """transformers on a whole conversation, from scratch: our preprocessing of its media
    (timed: a stateless pipeline repeats it), then prefill with pixels (vision inside it, timed
    by the probe) and a greedy decode. exact: (token ids, [(offset, item)]) of the engine's
    prompt (Session.prompt_for), fed instead of re-tokenising `messages` (answers as text do
    not always tokenise back to the ids the engine generated)."""
    from transformers import DynamicCache

    device = next(hf.parameters()).device
    t0 = time.perf_counter()
    p = prepare(engine, messages if exact is None else media_only(messages))
    preprocess = time.perf_counter() - t0
    if exact is not None:
        ids, media = exact
        positions, next_pos = mrope_positions(len(ids), media, engine.model.cfg.vision.tokens_per_second)
        p = replace(p, messages=messages, prompt_ids=list(ids), positions=positions, next_pos=next_pos)
    probe.take()
    r = hf_greedy(hf, p, device, new_tokens, DynamicCache(config=hf.config))
    v = probe.take()
    return {
        "ttft_s": r["ttft_s"], "preprocess_s": preprocess, "vision_encode_s": v["vision_encode_s"],
        "prefill_s": r["ttft_s"] - v["vision_encode_s"], "decode_ms_per_token": r["decode_ms_per_token"],
        "prompt_tokens": len(p.prompt_ids), "vision_calls": v["vision_calls"], "vision_tokens_encoded": v["vision_tokens"],
        "tokens": r["tokens"],
    }


def media_only(messages: list[dict]) -> list[dict]:
    """The conversation's media parts as one user message: preprocessed like the whole
    conversation, with no answer text to re-tokenise."""
    parts = [part for m in messages if isinstance(m.get("content"), list) for part in m["content"] if part.get("type") in ("image", "video")]
    return [{"role": "user", "content": parts}]


def without_last_answer(messages: list[dict]) -> list[dict]:
    """The conversation as the model saw it before answering: drop the trailing assistant turn."""
    return messages[:-1] if messages and messages[-1].get("role") == "assistant" else list(messages)


# ---------------------------------------------------------------------------------- W1
def engine_w1(engine, frames: int, size: int, seed: int, turns: int, sampling: SamplingParams, meter: MemoryMeter) -> tuple[list[dict], list[tuple], float]:
    """One session, `turns` questions -> (rows, per turn (messages, exact prompt) for the
    baseline, add_video s)."""
    probe = VisionProbe(engine.model.visual, engine.device)
    session = engine.session()
    try:
        ingest = add_clip(session, frames, size, seed)
        rows, convs = [], []
        for i in range(turns):
            exact = session.prompt_for(question(i))
            rows.append(engine_ask(engine, session, question(i), sampling, probe, meter))
            convs.append((without_last_answer(session.messages), exact))
    finally:
        session.close()
        probe.remove()
    return rows, convs, ingest


def hf_w1(hf, engine, convs: list[list[dict]], new_tokens: int) -> list[dict]:
    probe = VisionProbe(hf.model.visual, next(hf.parameters()).device)
    try:
        return [hf_turn(hf, engine, messages, new_tokens, probe, exact) for messages, exact in convs]
    finally:
        probe.remove()


def warm_up(engine, hf, frames: int, size: int, seed: int, sampling: SamplingParams, meter: MemoryMeter | None = None) -> None:
    """A two-turn conversation on another clip through each system (kernels compiled, pools
    grown); what the engine's part leaves allocated counts as resident in `meter`."""
    meter = meter or MemoryMeter(engine.device, 0)
    _, convs, _ = meter.warmup(lambda: engine_w1(engine, frames, size, seed + WARMUP_SEED_OFFSET, 2, sampling, MemoryMeter(engine.device, 0)))
    if hf is not None:
        hf_w1(hf, engine, convs[:1], sampling.max_new_tokens)


def cuda_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    return dev


def build_systems(model, dev: torch.device, dtype: torch.dtype, seed: int, options: dict, with_hf: bool):
    """-> (transformers or None, engine, engine's resident bytes)."""
    if with_hf:
        hf, engine = make_pair(model, str(dev), dtype, seed, **options)
        hf_bytes = tensor_bytes(list(hf.parameters()) + list(hf.buffers()))
    else:
        hf, hf_bytes = None, 0
        engine = make_engine(model, str(dev), dtype, seed, **options)
    resident = torch.cuda.memory_allocated(dev) - hf_bytes if dev.type == "cuda" else 0
    return hf, engine, resident


def run_multiturn(model, device: str, dtype: str, frames: int, size: int, turns: int, new_tokens: int, seed: int = 0, budget_gib: float | None = None, offload_vision: bool = False, repeats: int = 1,
                  weight_quant: str | None = None) -> dict:
    dev = cuda_device(device)
    tdtype = resolve_dtype(dtype, str(dev))
    context = video_tokens(frames, size) + turns * (new_tokens + TURN_TEXT_TOKENS) + 1024
    options = session_engine_options(model, frames, size, tdtype, 2 * context, budget_gib)
    if offload_vision:
        options["offload_vision"] = True
    if weight_quant:
        options["weight_quant"] = weight_quant
    hf, engine, resident = build_systems(model, dev, tdtype, seed, options, with_hf=budget_gib is None)
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    meter = MemoryMeter(dev, resident)
    warm_up(engine, hf, frames, size, seed, sampling, meter)
    ours, convs, ingest = engine_w1(engine, frames, size, seed, turns, sampling, meter)
    if repeats > 1:  # more conversations on other clips: each turn's TTFT becomes a median
        more = [engine_w1(engine, frames, size, seed + 1000 * r, turns, sampling, meter)[0] for r in range(1, repeats)]
        for i, row in enumerate(ours):
            row["ttft_runs_s"] = [row["ttft_s"]] + [m[i]["ttft_s"] for m in more]
            row["ttft_s"] = median(row["ttft_runs_s"])
    base = hf_w1(hf, engine, convs, new_tokens) if hf is not None else None
    return {
        "env": environment(dev, tdtype),
        "workload": {"model": str(model), "frames": frames, "size": size, "fps": 2.0, "turns": turns, "new_tokens": new_tokens,
                     "seed": seed, "video_tokens": video_tokens(frames, size), "engine_options": options,
                     "memory_budget_gib": budget_gib, "engine_repeats": repeats},
        "omnistream": {"add_video_s": ingest, "turns": ours},
        "transformers": None if base is None else {"turns": base},
        "summary": summarize(ours, base, budget_gib),
        "engine_stats": engine.stats(),
    }


# ---------------------------------------------------------------------------------- summary
def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def follow_up_stats(rows: list[dict] | None) -> dict:
    if not rows:
        return {"follow_up_ttft_s": None, "last_over_second_ttft": None}
    later = [r["ttft_s"] for r in rows[1:]]
    return {"follow_up_ttft_s": median(later), "last_over_second_ttft": ratio(rows[-1]["ttft_s"], rows[1]["ttft_s"]) if len(rows) > 1 else None}


def summarize(ours: list[dict], base: list[dict] | None, budget_gib: float | None) -> dict:
    peaks = [r["peak_bytes"] for r in ours if r["peak_bytes"] is not None]
    agree = None if base is None else [sum(x == y for x, y in zip(a["tokens"], b["tokens"])) for a, b in zip(base, ours)]
    return {
        "omnistream": follow_up_stats(ours) | {"vision_tokens_after_turn_1": sum(r["vision_tokens_encoded"] for r in ours[1:])},
        "transformers": follow_up_stats(base) | ({} if base is None else {"vision_calls": sum(r["vision_calls"] for r in base)}),
        "engine_peak_gib": max(peaks) / 2**30 if peaks else None,
        "memory_budget_gib": budget_gib,
        "equal_greedy_tokens_per_turn": agree,  # transformers' answer vs the engine's, same conversation
    }


# ---------------------------------------------------------------------------------- output
def fmt(x: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x * scale:.{digits}f}"


def times(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}x"


def print_header(name: str, r: dict, out=None) -> None:
    env, w = r["env"], r["workload"]
    where = env["gpu"] or f"CPU ({env['cpu']})"
    quant = (w.get("engine_options") or {}).get("weight_quant")
    dtype = env["dtype"] + (f" + {quant} LLM weights" if quant else "")
    print(f"omnistream bench {name}: {w['model']} {dtype} on {where}; torch {env['torch']}, transformers {env['transformers']}", file=out)
    print(f"workload: {w['frames']} frames {w['size']}x{w['size']} ({w['video_tokens']} video tokens), "
          f"{w['new_tokens']} new tokens per answer, greedy", file=out)
    if w.get("engine_repeats", 1) > 1:
        print(f"omnistream TTFT per turn: median of {w['engine_repeats']} conversations on different clips", file=out)


def print_turns(ours: list[dict], base: list[dict] | None, label: str = "turn", out=None) -> None:
    """One row per turn (or session): prompt, TTFT of both, ratio, vision work of both."""
    print(f"{label:>7}{'prompt':>8}{'cached':>8}{'tf TTFT ms':>12}{'omni TTFT ms':>14}{'ratio':>8}"
          f"{'vision calls tf/omni':>22}{'vision tok tf/omni':>20}", file=out)
    for i, o in enumerate(ours):
        b = base[i] if base else None
        ratio_txt = times(ratio(b["ttft_s"], o["ttft_s"]) if b else None)
        calls = f"{b['vision_calls'] if b else '-'}/{o['vision_calls']}"
        toks = f"{b['vision_tokens_encoded'] if b else '-'}/{o['vision_tokens_encoded']}"
        print(f"{i + 1:>7}{o['prompt_tokens']:>8}{o['cached_tokens'] if o['cached_tokens'] is not None else '-':>8}"
              f"{fmt(b['ttft_s'] if b else None, 1000):>12}{fmt(o['ttft_s'], 1000):>14}{ratio_txt:>8}{calls:>22}{toks:>20}", file=out)


STAGES = (("preprocess (decode, resize, hash)", "preprocess_s", 1000), ("vision encode", "vision_encode_s", 1000),
          ("prefill (LLM)", "prefill_s", 1000), ("TTFT (preprocess excluded)", "ttft_s", 1000), ("decode per token", "decode_ms_per_token", 1))


def print_stages(ours: list[dict], base: list[dict] | None, turns=(0, 1), out=None) -> None:
    """E1: stage breakdown (ms) of the given turns for both systems."""
    turns = [t for t in turns if t < len(ours)]
    cols = [(f"tf turn {t + 1}", base[t] if base else None) for t in turns] + [(f"omni turn {t + 1}", ours[t]) for t in turns]
    print(f"{'E1 stages (ms)':<36}" + "".join(f"{name:>14}" for name, _ in cols), file=out)
    for label, key, scale in STAGES:
        print(f"{label:<36}" + "".join(f"{fmt(row.get(key) if row else None, scale, 2):>14}" for _, row in cols), file=out)


def print_multiturn(r: dict, out=None) -> None:
    print_header("multiturn", r, out)
    ours, s = r["omnistream"]["turns"], r["summary"]
    base = r["transformers"]["turns"] if r["transformers"] else None
    if base is None:
        print("transformers: not run (a budget run holds only the engine on the card)", file=out)
    print_turns(ours, base, out=out)
    so, sb = s["omnistream"], s["transformers"]
    print(f"follow-up TTFT (median of turns 2..{len(ours)}): transformers {fmt(sb['follow_up_ttft_s'], 1000)} ms, "
          f"omnistream {fmt(so['follow_up_ttft_s'], 1000)} ms ({times(ratio(sb['follow_up_ttft_s'], so['follow_up_ttft_s']))})", file=out)
    print(f"TTFT turn {len(ours)} / turn 2: transformers {fmt(sb['last_over_second_ttft'], digits=2)}, "
          f"omnistream {fmt(so['last_over_second_ttft'], digits=2)}", file=out)
    if base is not None:
        print(f"vision tower (E2): transformers {sb['vision_calls']} calls in {len(base)} turns; omnistream encoded "
              f"{so['vision_tokens_after_turn_1']} vision tokens after turn 1", file=out)
    else:
        print(f"vision tower (E2): omnistream encoded {so['vision_tokens_after_turn_1']} vision tokens after turn 1", file=out)
    budget = f" (budget {s['memory_budget_gib']:.2f} GiB)" if s["memory_budget_gib"] is not None else ""
    print(f"engine peak memory: {fmt(s['engine_peak_gib'], digits=2)} GiB{budget}; add_video {fmt(r['omnistream']['add_video_s'], 1000)} ms", file=out)
    if s["equal_greedy_tokens_per_turn"] is not None:  # exact on CPU float32; bf16 rounding may move random-weight argmaxes
        print("greedy tokens equal to transformers' per turn: " + " ".join(f"{n}/{len(o['tokens'])}" for n, o in zip(s["equal_greedy_tokens_per_turn"], ours)), file=out)
    print_stages(ours, base, out=out)
    print_cache_stats(r["engine_stats"], out)


def print_cache_stats(stats: dict, out=None) -> None:
    enc, pre = stats.get("encoder_cache") or {}, stats.get("prefix_cache") or {}
    print(f"engine caches: encoder hits {enc.get('hits', 'n/a')} misses {enc.get('misses', 'n/a')}; prefix queries "
          f"{pre.get('queries', 'n/a')} tokens, hits {pre.get('hit_tokens', 'n/a')} tokens; vision tokens encoded "
          f"{stats.get('vision_tokens_encoded', 'n/a')} in all (warm-up included)", file=out)


def write_json(report: dict, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {path}")


def model_arg(args) -> str:
    return args.model_config or ("demo" if args.model == "demo" else args.model)


def cmd_multiturn(args) -> int:
    from omnistream.entrypoints.options import default_device

    report = run_multiturn(model_arg(args), default_device(args.device), args.dtype, args.frames, args.size, args.turns,
                           args.new_tokens, args.seed, args.memory_budget_gib, args.offload_vision, args.repeats,
                           getattr(args, "weight_quant", None))
    print_multiturn(report)
    write_json(report, args.json)
    return 0
