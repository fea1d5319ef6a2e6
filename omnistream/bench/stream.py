"""`omnistream bench stream` (W4): live video sessions against the seed's approach.

  (a) ingestion: N generated frames handed over at once (faster than real time), then flush;
      frames/s = N / wall, with prefill_on_arrival off (resize, pair, memory, patchify, hash,
      no model) and on (the retained frames also encoded and prefilled as they arrive).
  (b) one live session per KV policy (exact, fast) fed the same simulated camera at --fps as
      fast as possible; at each stream length in --minutes (cumulative): TTFT of a question with
      no new frames (asked twice, the second reported), TTFT right after 2 new frames (add 2 and
      ask at once: the question waits for them to be ingested, encoded and prefilled), device
      memory allocated, Star/Stream sizes; then both sessions answer the same question with
      logits: the divergence of `fast` from `exact`.
  (c) the seed's approach at the same points: transformers re-encodes all retained frames at the
      question (one forward over the exact session's prompt + pixels; TTFT = vision + prefill).

Frames are generated cheaply: a few blocky random textures ("scenes", a cut every ~30 s) moved
with np.roll, so the frame memory has cuts to find and motion to window. Everything is warmed up
on another session first.
"""

from __future__ import annotations

import gc
import time

import numpy as np
import torch

from omnistream.bench.latency import environment, tensor_bytes
from omnistream.bench.models import make_pair, resolve_dtype
from omnistream.bench.multiturn import model_arg, model_config, write_json
from omnistream.bench.native import native_answer
from omnistream.engine.sampling import SamplingParams
from omnistream.errors import ConfigError
from omnistream.media.frame_memory import FrameMemoryConfig

TARGETS = {"ingest_fps": 300.0, "ttft_no_new_ms": 30.0, "ttft_after_new_ms": 100.0}
SCENE_SECONDS = 30
CHUNK = 240  # frames handed over per add_frames call in (b) (bounds host memory of the backlog)
QUESTIONS = ("What is on screen right now?", "What changed since the start?", "Describe the last few seconds.",
             "Describe the scene in detail.")


class SceneFrames:
    """Frame i of a synthetic camera: a blocky random texture per scene (a cut every
    SCENE_SECONDS; scenes never repeat, so nothing is served by a cache by accident), rolled
    sideways a few pixels per frame inside the scene (motion)."""

    def __init__(self, size: int, fps: float, seed: int = 0) -> None:
        self.size, self.seed = size, seed
        self.block = max(2, size // 8)
        self.per_scene = max(1, round(SCENE_SECONDS * fps))
        self.step = max(1, size // 64)
        self.fps = fps
        self._bases: dict[int, np.ndarray] = {}  # the current scenes only

    def base(self, scene: int) -> np.ndarray:
        if scene not in self._bases:
            if len(self._bases) > 4:
                self._bases.pop(min(self._bases))
            rng = np.random.default_rng([self.seed, scene])
            cells = -(-self.size // self.block)
            tex = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
            self._bases[scene] = np.repeat(np.repeat(tex, self.block, 0), self.block, 1)[: self.size, : self.size]
        return self._bases[scene]

    def frames(self, start: int, n: int) -> tuple[list[np.ndarray], list[float]]:
        out = []
        for i in range(start, start + n):
            out.append(np.roll(self.base(i // self.per_scene), (i % self.per_scene) * self.step, axis=1))
        return out, [i / self.fps for i in range(start, start + n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device) / 2**30


def ingest_rate(engine, cam: SceneFrames, n: int, size: int, prefill: bool, start: int = 0, policy: str = "exact") -> dict:
    """(a) n frames handed over at once, then flush -> frames/s."""
    live = engine.live_session(max_pixels=size * size, min_pixels=size * size, prefill_on_arrival=prefill, policy=policy)
    try:
        frames, stamps = cam.frames(start, n)
        _sync(engine.device)
        t0 = time.perf_counter()
        live.add_frames(frames, stamps)
        live.flush(timeout=600)
        _sync(engine.device)
        wall = time.perf_counter() - t0
        return {"frames": n, "wall_s": wall, "frames_per_s": n / wall, "prefill_on_arrival": prefill, "policy": policy}
    finally:
        live.close()


def feed(live, cam: SceneFrames, start: int, stop: int) -> float:
    """Frames [start, stop) as fast as possible, in chunks; -> wall seconds (flushed)."""
    t0 = time.perf_counter()
    for s in range(start, stop, CHUNK):
        frames, stamps = cam.frames(s, min(CHUNK, stop - s))
        live.add_frames(frames, stamps)
        if s + CHUNK < stop:
            live.flush(timeout=600)  # bounded backlog; the worker keeps ingesting meanwhile
    live.flush(timeout=600)
    _sync(live.engine.device)
    return time.perf_counter() - t0


REPS = 3  # questions of each kind per stream length; the median is reported


def measure_point(sessions: dict, cam: SceneFrames, fed: int, sampling: SamplingParams) -> dict:
    """(b) at the current stream length, for every policy's session; adds 2 * REPS frames to
    each. TTFT after new frames: the question is asked as soon as add_frames returns, so it
    includes ingesting, encoding and prefilling them. Medians of REPS questions of each kind
    (every sample is kept). Sessions share the encoder cache, so before a later policy gets the
    same 2 frames their cache entry is dropped: every policy pays their encoding."""
    quiet, after = {}, {p: [] for p in sessions}
    for p, live in sessions.items():
        live.ask(QUESTIONS[0], sampling)
        quiet[p] = [live.ask(QUESTIONS[1], sampling) for _ in range(REPS)]  # no new frames since the previous question
    for r in range(REPS):
        frames, stamps = cam.frames(fed + 2 * r, 2)
        encoded = None
        for p, live in sessions.items():
            if encoded is not None:
                live.engine.discard_encoder_entries([encoded])
            live.add_frames(frames, stamps)
            after[p].append(live.ask(QUESTIONS[2], sampling))
            newest = live.patches.get(max(live.patches, default=-1))
            encoded = newest.hash if newest is not None else None
    return {p: _point(live, quiet[p], after[p]) for p, live in sessions.items()}


def _point(live, quiet: list, after: list) -> dict:
    stats = live.memory.stats()
    q = sorted(quiet, key=lambda x: x.metrics.ttft_s)[REPS // 2]
    a = sorted(after, key=lambda x: x.metrics.ttft_s)[REPS // 2]
    return {
        "ttft_no_new_s": q.metrics.ttft_s, "ttft_no_new_samples_s": [x.metrics.ttft_s for x in quiet],
        "no_new_frames_encoded": max(x.live.frames_encoded for x in quiet),
        "no_new_cached_tokens": q.metrics.cached_tokens, "no_new_prompt_tokens": q.metrics.prompt_tokens,
        "ttft_after_new_s": a.metrics.ttft_s, "ttft_after_new_samples_s": [x.metrics.ttft_s for x in after],
        "after_new_samples": [{"ttft_s": x.metrics.ttft_s, "encoding_latency": x.live.encoding_latency,
                               "prefill_latency": x.live.prefill_latency, "cached_tokens": x.metrics.cached_tokens,
                               "prompt_tokens": x.metrics.prompt_tokens, "frames_encoded": x.live.frames_encoded} for x in after],
        "after_new_frames_encoded": a.live.frames_encoded,
        "after_new_encoding_s": a.live.encoding_latency, "after_new_prefill_s": a.live.prefill_latency,
        "prompt_tokens": a.metrics.prompt_tokens, "cached_tokens": a.metrics.cached_tokens,
        "visual_tokens": a.live.visual_tokens, "kv_cache_length": a.live.kv_cache_length,
        "star_size": stats.star_size, "stream_size": stats.stream_size,
        "frames_added": stats.frames_added, "compression_ratio": stats.compression_ratio,
    }


def divergence(sessions: dict, question: str, new_tokens: int, hf, tps: float) -> dict:
    """Asks every session the same question, greedy, with logits: policy fast against exact.
    first-token top-1 agreement, relative L2 error of the first token's logits, and greedy
    tokens equal at the same positions (free-running: one flip changes all later tokens). The
    noise floor for scale: the same error between exact and transformers over exact's prompt
    (two correct bf16 computations of one function)."""
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    ids, media = sessions["exact"].prompt_for(question)
    res = {p: live.ask(question, sampling, return_logits=True) for p, live in sessions.items()}
    a, b = res["exact"], res["fast"]
    la, lb = a.logits[0].float(), b.logits[0].float()
    ref = native_answer(hf, ids, media, 1, tps)["first_logits"]
    same = sum(x == y for x, y in zip(a.token_ids, b.token_ids))
    return {"top1_agree": bool(la.argmax() == lb.argmax()), "logit_rel_err": float((la - lb).norm() / la.norm()),
            "noise_rel_err": float((la - ref).norm() / ref.norm()), "noise_top1_agree": bool(la.argmax() == ref.argmax()),
            "tokens_equal": same, "tokens": len(a.token_ids), "exact_tokens": a.token_ids, "fast_tokens": b.token_ids}


class GCPauses:
    """Durations of the garbage collector's runs (a full collection can stall a question)."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses.append(time.perf_counter() - self._t0)

    def summary(self) -> dict:
        p = sorted(self.pauses)
        return {"count": len(p), "total_s": sum(p), "max_s": p[-1] if p else 0.0}


def run_stream(model, device: str, dtype: str, size: int, minutes: list[float], fps: float, new_tokens: int, seed: int = 0,
               policies: tuple[str, ...] = ("exact", "fast")) -> dict:
    if size % 28:
        raise ConfigError(f"--size must be a multiple of 28, got {size}")
    tdtype = resolve_dtype(dtype, device)
    mcfg = model_config(model)
    mem = FrameMemoryConfig()
    per_patch = (size // 28) ** 2
    context = (mem.star_patches + mem.stream_patches + 2) * per_patch + 1024
    patch_bytes = per_patch * mcfg.vision.out_hidden_size * torch.finfo(tdtype).bits // 8
    opts = {"enable_prefix_caching": True, "kv_cache_tokens": (2 + 2 * len(policies)) * context,
            "encoder_cache_bytes": max(64 << 20, 4 * (mem.star_patches + mem.stream_patches + 4) * patch_bytes)}
    hf, engine = make_pair(model, device, tdtype, seed, **opts)
    dev = engine.device
    hf_bytes = tensor_bytes(list(hf.parameters()) + list(hf.buffers()))
    tps = engine.model.cfg.vision.tokens_per_second
    sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    total = [round(m * 60 * fps) for m in minutes]
    if any(b <= a for a, b in zip([0] + total, total)):
        raise ConfigError(f"--minutes must increase and each must add frames, got {minutes}")
    live_opts = {"max_pixels": size * size, "min_pixels": size * size}

    # warm-up: another camera, enough frames to fill both memories, every kind of question
    warm_cam = SceneFrames(size, fps, seed=seed + 1000)
    n_warm = 2 * (mem.star_capacity + mem.stream_capacity) + 2 * round(SCENE_SECONDS * fps)
    for policy in policies:
        warm = engine.live_session(policy=policy, **live_opts)
        feed(warm, warm_cam, 0, n_warm)
        measure_point({policy: warm}, warm_cam, n_warm, sampling)
        if policy == policies[0]:
            for _ in range(2):  # transformers too (kernel selection, allocator)
                native_answer(hf, *warm.prompt_for(QUESTIONS[2]), 1, tps)
        warm.close()
    ingest_rate(engine, warm_cam, min(64, n_warm), size, prefill=True, start=n_warm + 8)

    # (a) on cameras of their own: their patches must not be in the encoder cache for (b)
    n_ingest = min(600, total[-1])
    ingest = [ingest_rate(engine, SceneFrames(size, fps, seed=seed + 2000 + i), n_ingest, size, prefill=p, policy=pol)
              for i, (p, pol) in enumerate([(False, "exact"), (True, "exact")] + [(True, "fast")] * ("fast" in policies))]
    cam = SceneFrames(size, fps, seed=seed)

    sessions = {p: engine.live_session(policy=p, **live_opts) for p in policies}
    rows, fed = [], 0
    gc_pauses = GCPauses()
    gc.callbacks.append(gc_pauses)
    try:
        for m, target in zip(minutes, total):
            row = {"minutes": m, "frames_fed": target, "segment_frames": target - fed}
            for p, live in sessions.items():
                wall = feed(live, cam, fed, target)
                row[p] = {"segment_wall_s": wall, "ingest_fps": (target - fed) / wall}
            fed = target
            for p, point in measure_point(sessions, cam, fed, sampling).items():
                row[p] |= point
            fed += 2 * REPS
            exact = sessions.get("exact")
            if exact is not None:
                ids, media = exact.prompt_for(QUESTIONS[2])
                row["seed_ttft_s"] = native_answer(hf, ids, media, 1, tps)["ttft_s"]
            if len(sessions) == 2:
                row["divergence"] = divergence(sessions, QUESTIONS[3], new_tokens, hf, tps)
            row["allocated_gib"] = _allocated_gib(dev)
            row["engine_gib"] = None if row["allocated_gib"] is None else row["allocated_gib"] - hf_bytes / 2**30
            rows.append(row)
    finally:
        gc.callbacks.remove(gc_pauses)
        for live in sessions.values():
            live.close()
    return {
        "gc_pauses": gc_pauses.summary(),
        "env": environment(dev, tdtype),
        "workload": {"model": str(model), "size": size, "fps": fps, "minutes": minutes, "new_tokens": new_tokens,
                     "tokens_per_patch": per_patch, "policies": list(policies),
                     "memory": {"star_capacity": mem.star_capacity, "stream_capacity": mem.stream_capacity,
                                "importance_threshold": mem.importance_threshold},
                     "scene_seconds": SCENE_SECONDS, "engine_options": opts},
        "ingest": ingest, "lengths": rows, "targets": TARGETS, "transformers_weights_gib": hf_bytes / 2**30,
        "engine_stats": {k: v for k, v in engine.stats().items() if isinstance(v, (int, float, str, dict))},
    }


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1000:.1f}"


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def print_stream(r: dict, out=None) -> None:
    env, w = r["env"], r["workload"]
    where = env["gpu"] or f"CPU ({env['cpu']})"
    print(f"omnistream bench stream (W4): {w['model']} {env['dtype']} on {where}; torch {env['torch']}, transformers {env['transformers']}", file=out)
    print(f"camera: {w['size']}x{w['size']} at {w['fps']} fps ({w['tokens_per_patch']} tokens per 2-frame patch), a cut every "
          f"{w['scene_seconds']} s; memory star {w['memory']['star_capacity']} + stream {w['memory']['stream_capacity']} frames; "
          f"{w['new_tokens']} new tokens per answer", file=out)
    for g in r["ingest"]:
        mode = f"prefill on arrival, policy {g['policy']}" if g["prefill_on_arrival"] else "no prefill (CPU path only)"
        print(f"(a) ingest, {g['frames']} frames at once, {mode}: {g['frames_per_s']:.0f} frames/s ({g['wall_s']:.2f} s)  "
              f"target >= {TARGETS['ingest_fps']:.0f}", file=out)
    pols = w["policies"]
    head = f"{'minutes':>8}{'frames':>7}" + "".join(f"{'ingest f/s ' + p:>17}{'TTFT no-new ' + p:>19}{'TTFT 2-new ' + p:>18}" for p in pols)
    head += f"{'seed TTFT':>10}{'GPU GiB':>9}{'star/stream':>12}"
    print(head + f"   (ms, median of {REPS}; TTFT 2-new: asked as add_frames returns)", file=out)
    for x in r["lengths"]:
        line = f"{x['minutes']:>8g}{x['frames_fed']:>7}"
        for p in pols:
            y = x[p]
            line += f"{y['ingest_fps']:>17.0f}{_ms(y['ttft_no_new_s']):>19}{_ms(y['ttft_after_new_s']):>18}"
        y = x[pols[0]]
        line += f"{_ms(x.get('seed_ttft_s')):>10}{_gib(x['allocated_gib']):>9}{str(y['star_size']) + '/' + str(y['stream_size']):>12}"
        print(line, file=out)
    tgt = f"{'target':>8}{'':>7}" + "".join(f"{'>=' + format(TARGETS['ingest_fps'], '.0f'):>17}{'<=' + format(TARGETS['ttft_no_new_ms'], '.0f'):>19}"
                                            f"{'<=' + format(TARGETS['ttft_after_new_ms'], '.0f'):>18}" for p in pols)
    print(tgt + f"{'':>10}{'flat':>9}", file=out)
    if any("divergence" in x for x in r["lengths"]):
        print("divergence of policy fast from exact (same frames, same question, greedy):", file=out)
        for x in r["lengths"]:
            d = x.get("divergence")
            if d:
                print(f"  {x['minutes']:>6g} min: first token top-1 {'same' if d['top1_agree'] else 'DIFFERENT'}, logits rel. L2 error "
                      f"{d['logit_rel_err']:.3e} (noise floor, exact vs transformers: {d['noise_rel_err']:.3e}), "
                      f"greedy tokens equal {d['tokens_equal']}/{d['tokens']}", file=out)
    rows = r["lengths"]
    mems = [x["allocated_gib"] for x in rows if x["allocated_gib"] is not None]
    flat = f"{max(mems) - min(mems):.3f} GiB spread" if mems else "n/a on CPU"
    for p in pols:
        no_new = max(x[p]["ttft_no_new_s"] for x in rows) * 1000
        after = max(x[p]["ttft_after_new_s"] for x in rows) * 1000
        fps_min = min([x[p]["ingest_fps"] for x in rows] + [g["frames_per_s"] for g in r["ingest"] if g["policy"] == p])
        print(f"worst, policy {p}: ingest {fps_min:.0f} f/s ({'ok' if fps_min >= TARGETS['ingest_fps'] else 'MISS'}), TTFT no-new "
              f"{no_new:.1f} ms ({'ok' if no_new <= TARGETS['ttft_no_new_ms'] else 'MISS'}), TTFT after 2 new {after:.1f} ms "
              f"({'ok' if after <= TARGETS['ttft_after_new_ms'] else 'MISS'})", file=out)
    print(f"memory (both sessions alive): {flat}", file=out)
    if "gc_pauses" in r:
        g = r["gc_pauses"]
        print(f"garbage collector during (b): {g['count']} runs, {1000 * g['total_s']:.1f} ms in all, longest {1000 * g['max_s']:.1f} ms", file=out)
    print("seed approach = transformers re-encoding all retained frames at the question (vision + prefill over the exact "
          "policy's prompt for the 2-new question)", file=out)


def cmd_stream_bench(args) -> int:
    try:
        minutes = [float(m) for m in str(args.minutes).split(",") if m.strip()]
    except ValueError:
        raise ConfigError(f"--minutes is a comma list of numbers, got {args.minutes!r}") from None
    if not minutes or any(m <= 0 for m in minutes):
        raise ConfigError(f"--minutes needs positive lengths, got {args.minutes!r}")
    if args.new_tokens < 1 or args.fps <= 0:
        raise ConfigError("--new-tokens must be >= 1 and --fps > 0")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    r = run_stream(model_arg(args), device, args.dtype, args.size, minutes, args.fps, args.new_tokens, args.seed)
    print_stream(r)
    write_json(r, args.json)
    return 0
