"""`omnistream bench concurrency` (W3): N clients at once, each its own session, one engine.

Every client is a thread with its own session; their questions batch into the engine loop's
shared forward passes. Workloads (`--mix`, comma separated; each item is one configuration,
`a+b` gives the clients of one configuration workloads a and b in turn):
  text     a follow-up question over a cached text context of ~--context-tokens tokens: the
           session first gets a long text turn of its own (seeded words, distinct per client),
           answered once untimed (the warm-up turn), then the timed follow-up
  video8   a question about an 8-frame --size x --size clip of the client's own (seeded)
  video64  the same with a 64-frame clip
Media preprocessing (decode, resize, hash: `add_video`) happens before the arrivals and is
reported on its own; TTFT counts from ask(), as Session.ask does. Arrivals: `burst` (every
client released at once by one Event) or `poisson --rate R` (requests/s).

Per configuration: aggregate output tokens/s (all tokens / wall time from the first arrival to
the last finish), TTFT p50/p90/p99, inter-token latency p50/p99 (metrics.token_times of every
request), the mean running batch (engine counters seqs/steps over the run) and the batched-decode
floor N / (decoder + lm_head weight bytes / measured copy bandwidth) beside it.

Baseline, in the same run: transformers, one request at a time, on at most --baseline-requests
of the requests of the largest configuration of each mix (fed the exact token ids the engine
prefilled: the whole context + question each time, as a stateless pipeline re-prefills it). Its
measured per-request latency and tokens/s are printed; the time to serve all N requests that way
is N x the measured mean per-request time, labelled as computed.

Encoder interference: M text clients stream long answers (engine.submit + the handle's deltas)
while one other client asks about a --interference-frames clip; the text answers' inter-token
latency for tokens produced between the clip question's arrival and its first token, against
the same text workload without the clip (its steady decode: from when every stream has
--interference-tokens/8 tokens to the first stream's end).
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from omnistream.bench.interference import run_interference
from omnistream.bench.latency import decode_floor, environment, measure_bandwidth, tensor_bytes
from omnistream.bench.models import make_engine, make_pair, resolve_dtype
from omnistream.bench.multiturn import add_clip, cuda_device, model_arg, question, write_json
from omnistream.bench.native import native_answer
from omnistream.bench.stats import mean, pct
from omnistream.bench.text_prompts import SYSTEM, context_prompt, text_question
from omnistream.bench.workload import video_tokens
from omnistream.engine.sampling import SamplingParams

WORKLOADS = {"text": 0, "video8": 8, "video64": 64}  # kind -> frames (0: text)
WARM_TURN_TOKENS = 8  # answer of the untimed context turn of a text client
TURN_TOKENS = 96  # KV room per turn beyond its answer: template, question
INTERFERENCE_CONTEXT = 256  # text tokens of each interference client's prompt (at most)
SEED_CONFIG, SEED_WARMUP = 1000, 100_000

# (mix, clients, metric, comparison, bound, label): for 3B on an H200, burst arrivals
TARGETS = (
    ("text", 32, "tokens_per_s", ">=", 8000.0, "32 text clients >= 8,000 tok/s"),
    ("text", 32, "ttft_p99_s", "<=", 0.150, "32 text clients TTFT p99 <= 150 ms"),
    ("text", 64, "tokens_per_s", ">=", 12000.0, "64 text clients >= 12,000 tok/s"),
    ("video8", 32, "ttft_p99_s", "<=", 1.5, "32 video8 clients TTFT p99 <= 1.5 s"),
)
INTERFERENCE_TARGET = 2.0  # text ITL p99 while a clip is encoded/prefilled / without it



# ---------------------------------------------------------------------------------- inputs
def parse_clients(text: str) -> list[int]:
    values = [int(x) for x in str(text).split(",") if x.strip()]
    if not values or any(v < 1 for v in values):
        raise SystemExit(f"error: --clients must be positive integers, comma separated, got {text!r}")
    return values


def parse_mixes(text: str) -> list[tuple[str, ...]]:
    mixes = []
    for item in str(text).split(","):
        kinds = tuple(k.strip() for k in item.split("+") if k.strip())
        bad = [k for k in kinds if k not in WORKLOADS]
        if not kinds or bad:
            raise SystemExit(f"error: --mix items are {', '.join(WORKLOADS)} (or a+b), got {item!r}")
        mixes.append(kinds)
    return mixes


def mix_name(kinds: tuple[str, ...]) -> str:
    return "+".join(kinds)


@dataclass
class Client:
    index: int
    kind: str  # a WORKLOADS key
    seed: int


def make_clients(kinds: tuple[str, ...], n: int, seed_base: int) -> list[Client]:
    return [Client(i, kinds[i % len(kinds)], seed_base + i) for i in range(n)]


def per_request_kv(kind: str, size: int, context_tokens: int, new_tokens: int) -> int:
    frames = WORKLOADS[kind]
    if frames:
        return video_tokens(frames, size) + TURN_TOKENS + new_tokens
    return context_tokens + 2 * TURN_TOKENS + WARM_TURN_TOKENS + new_tokens


# ---------------------------------------------------------------------------------- engine counters
def counter_delta(before: dict, after: dict) -> dict:
    steps = after["steps"] - before["steps"]
    seqs = after["seqs"] - before["seqs"]
    return {"steps": steps, "seqs": seqs, "rows": after["rows"] - before["rows"],
            "decode_steps": after["decode_steps"] - before["decode_steps"],
            "mean_seqs_per_step": seqs / steps if steps else None, "max_seqs_engine_lifetime": after["max_seqs"]}


# ---------------------------------------------------------------------------------- clients
def _client_main(engine, c: Client, opts: dict, ready: threading.Barrier, go: threading.Event, start: list, offset: float, out: dict) -> None:
    """One client: its session, the untimed setup (context turn or add_video), then at its
    arrival the timed question."""
    try:
        s = engine.session(system=SYSTEM)
        out["session"] = s
        if c.kind == "text":
            t0 = time.perf_counter()
            s.ask(context_prompt(engine.tokenizer, opts["context_tokens"], c.seed), SamplingParams(max_new_tokens=WARM_TURN_TOKENS, ignore_eos=True))
            out["warm_turn_s"] = time.perf_counter() - t0
            q = text_question(c.index, c.seed)
        else:
            out["add_video_s"] = add_clip(s, WORKLOADS[c.kind], opts["size"], c.seed)
            q = question(c.index)
        if opts["keep_prompt"](c):
            out["prompt"] = s.prompt_for(q)  # the baseline prefills exactly these ids
        ready.wait()
        go.wait()
        delay = start[0] + offset - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        out["result"] = s.ask(q, opts["sampling"])
    except threading.BrokenBarrierError:
        pass  # another client failed during setup
    except Exception as e:  # noqa: BLE001 - reported by the driver
        out["error"] = e
        ready.abort()


def run_clients(engine, clients: list[Client], sampling: SamplingParams, size: int, context_tokens: int,
                arrival: str = "burst", rate: float | None = None, rng_seed: int = 0, keep_prompts: int = 0) -> dict:
    """Every client's setup in parallel, then their questions at the arrivals -> raw results."""
    n = len(clients)
    if arrival == "poisson":
        gaps = np.random.default_rng(rng_seed).exponential(1.0 / rate, n)
        offsets = np.concatenate([[0.0], np.cumsum(gaps[1:])]).tolist()
    else:
        offsets = [0.0] * n
    opts = {"size": size, "context_tokens": context_tokens, "sampling": sampling, "keep_prompt": lambda c: c.index < keep_prompts}
    ready, go, start = threading.Barrier(n + 1), threading.Event(), [0.0]
    outs: list[dict[str, Any]] = [{} for _ in clients]
    threads = [threading.Thread(target=_client_main, args=(engine, c, opts, ready, go, start, off, o), name=f"client-{c.index}", daemon=True)
               for c, off, o in zip(clients, offsets, outs)]
    for t in threads:
        t.start()
    try:
        try:
            ready.wait()
        except threading.BrokenBarrierError:
            go.set()
            for t in threads:
                t.join()
            raise next(o["error"] for o in outs if "error" in o) from None
        before = engine.stats()["engine"]
        start[0] = time.perf_counter()
        go.set()
        for t in threads:
            t.join()
        after = engine.stats()["engine"]
        failed = [o["error"] for o in outs if "error" in o]
        if failed:
            raise failed[0]
    finally:
        for o in outs:
            if "session" in o:
                o["session"].close()
    return {"outs": outs, "start": start[0], "offsets": offsets, "counters": counter_delta(before, after)}


def summarize_run(clients: list[Client], run: dict, floor: dict) -> dict:
    outs, t_go = run["outs"], run["start"]
    results = [o["result"] for o in outs]
    ms = [r.metrics for r in results]
    first = min(m.arrival for m in ms)
    last = max(m.finished_at for m in ms)
    wall = last - first
    tokens = sum(len(r.token_ids) for r in results)
    ttft = [m.ttft_s for m in ms]
    itl = [x for m in ms for x in m.inter_token_s]
    n = len(clients)
    floor_tps = n * floor["bandwidth_bytes_per_s"] / floor["decoder_weight_bytes"]
    context = mean([m.prompt_tokens for m in ms]) or 0
    kv_per_token = floor["kv_bytes_per_token"]
    floor_kv_tps = n * floor["bandwidth_bytes_per_s"] / (floor["decoder_weight_bytes"] + n * kv_per_token * context)
    counters = run["counters"]
    return {
        "clients": n,
        "requests": [{
            "client": c.index, "kind": c.kind, "seed": c.seed, "arrival_offset_s": m.arrival - t_go, "planned_offset_s": off,
            "ttft_s": m.ttft_s, "finished_offset_s": m.finished_at - t_go, "queue_s": m.queue_s, "output_tokens": len(r.token_ids),
            "prompt_tokens": m.prompt_tokens, "cached_tokens": m.cached_tokens, "media_tokens": m.media_tokens,
            "vision_encode_s": m.vision_encode_s, "prefill_s": m.prefill_s, "add_video_s": o.get("add_video_s"),
            "warm_turn_s": o.get("warm_turn_s"), "inter_token_s": m.inter_token_s,
        } for c, o, r, m, off in zip(clients, outs, results, ms, run["offsets"])],
        "wall_s": wall,
        # first to last arrival: with a burst, the submitting threads' own time (chat template,
        # tokenizer, positions under the interpreter lock); the wall includes it
        "arrival_spread_s": max(m.arrival for m in ms) - first,
        "output_tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "ttft_p50_s": pct(ttft, 50), "ttft_p90_s": pct(ttft, 90), "ttft_p99_s": pct(ttft, 99),
        "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99), "itl_samples": len(itl),
        "mean_running_batch": counters["mean_seqs_per_step"],
        "engine_counters": counters,
        "floor_tokens_per_s": floor_tps,
        "floor_with_kv_tokens_per_s": floor_kv_tps,
        "fraction_of_floor": (tokens / wall / floor_tps) if wall > 0 else None,
        "mean_prompt_tokens": context,
        "mean_cached_tokens": mean([m.cached_tokens for m in ms]),
        "add_video_mean_s": mean([o.get("add_video_s") for o in outs]),
        "add_video_max_s": max((o["add_video_s"] for o in outs if o.get("add_video_s") is not None), default=None),
        "vision_encode_mean_s": mean([m.vision_encode_s for m in ms]),
    }


# ---------------------------------------------------------------------------------- baseline
def run_baseline(hf, engine, run: dict, limit: int, new_tokens: int) -> list[dict]:
    """transformers, one request at a time, on the first `limit` requests of a run (their exact
    prompts: whole context + question, media included) -> per request row."""
    tps = engine.model.cfg.vision.tokens_per_second
    rows = []
    for o in run["outs"][:limit]:
        ids, media = o["prompt"]
        r = native_answer(hf, ids, media, new_tokens, tps)
        engine_tokens = o["result"].token_ids
        rows.append({"ttft_s": r["ttft_s"], "total_s": r["total_s"], "prompt_tokens": r["prompt_tokens"],
                     "output_tokens": len(r["tokens"]), "tokens_per_s": len(r["tokens"]) / r["total_s"] if r["total_s"] > 0 else None,
                     "equal_tokens_to_engine": sum(a == b for a, b in zip(r["tokens"], engine_tokens)), "compared_tokens": min(len(r["tokens"]), len(engine_tokens))})
    return rows


def baseline_summary(rows: list[dict]) -> dict:
    total = sum(r["total_s"] for r in rows)
    return {
        "requests_measured": len(rows),
        "per_request_s": total / len(rows) if rows else None,
        "ttft_mean_s": mean([r["ttft_s"] for r in rows]),
        "tokens_per_s": sum(r["output_tokens"] for r in rows) / total if total > 0 else None,
        "requests": rows,
    }


# ---------------------------------------------------------------------------------- driver
def scheduling_in_effect(cfg) -> dict:
    """The settings that decide what a step carries while answers decode, as the engine resolved
    them (defaults that depend on the device included), for the report."""
    sc = cfg.scheduler
    return {"prefill tokens per request": sc.max_step_tokens_while_decoding, "cap scope": sc.prefill_cap_scope,
            "context cap from": sc.prefill_context_tokens_while_decoding or "off",
            "vision slice rows": cfg.vision_slices or "off", "encode ahead on a side stream": cfg.encode_ahead}


def workload_engine_options(clients: list[int], mixes: list[tuple[str, ...]], size: int, context_tokens: int, new_tokens: int,
                   interference: int, interference_tokens: int, interference_frames: int, given: dict | None = None) -> dict:
    """KV pool for the largest configuration (sessions close between configurations) or the
    interference run, with a quarter to spare; enough sequence slots for every client; then
    the engine options the user gave (they win)."""
    need = max([n * max(per_request_kv(k, size, context_tokens, new_tokens) for k in kinds) for n in clients for kinds in mixes] or [0])
    if interference:
        need = max(need, interference * (min(context_tokens, INTERFERENCE_CONTEXT) + TURN_TOKENS + interference_tokens)
                   + video_tokens(interference_frames, size) + TURN_TOKENS + new_tokens)
    return {"kv_cache_tokens": int(need * 1.25) + 4096, "max_num_seqs": max([64, interference + 1, *clients])} | (given or {})


def run_concurrency(model, device: str, dtype: str, clients: list[int], mixes: list[tuple[str, ...]], size: int = 448,
                    context_tokens: int = 1024, new_tokens: int = 64, arrival: str = "burst", rate: float | None = None,
                    baseline_requests: int = 4, interference_clients: int = 16, interference_tokens: int = 128,
                    interference_frames: int = 64, warmup_clients: int = 4, seed: int = 0, log=print,
                    engine_opts: dict | None = None) -> dict:
    """engine_opts: keyword arguments of the engine (e.g. engine_process=True,
    max_num_batched_tokens=...), over the sizes this workload needs."""
    dev = cuda_device(device)
    tdtype = resolve_dtype(dtype, str(dev))
    options = workload_engine_options(clients if mixes else [], mixes, size, context_tokens, new_tokens, interference_clients,
                             interference_tokens, interference_frames, engine_opts)
    with_hf = baseline_requests > 0 and bool(mixes)
    if with_hf:
        hf, engine = make_pair(model, str(dev), tdtype, seed, **options)
    else:
        hf, engine = None, make_engine(model, str(dev), tdtype, seed, **options)
    try:
        bw, bw_samples = measure_bandwidth(dev)
        floor = decode_floor(engine.model, bw, context_tokens + new_tokens // 2)
        t = engine.model.cfg.text
        floor |= {"bandwidth_samples": bw_samples,
                  "kv_bytes_per_token": 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * next(engine.model.parameters()).element_size(),
                  "model_weight_bytes": tensor_bytes(engine.model.parameters())}
        sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        configs, baselines = [], {}
        if mixes:
            warm_n = max(1, min(warmup_clients, max(clients)))
            for j, kinds in enumerate(mixes):  # warm-up: a small run of each mix (+ one transformers request)
                log(f"warm-up: {mix_name(kinds)} x {warm_n}")
                run = run_clients(engine, make_clients(kinds, warm_n, seed + SEED_WARMUP + 1000 * j), sampling, size, context_tokens,
                                  keep_prompts=1 if with_hf else 0)
                if with_hf:
                    run_baseline(hf, engine, run, 1, new_tokens)
            index = 0
            for kinds in mixes:
                largest = max(clients)
                for n in clients:
                    index += 1
                    cs = make_clients(kinds, n, seed + SEED_CONFIG * index)
                    keep = min(baseline_requests, n) if with_hf and n == largest else 0
                    run = run_clients(engine, cs, sampling, size, context_tokens, arrival, rate, seed + index, keep)
                    row = {"mix": mix_name(kinds), "arrival": arrival, "rate": rate} | summarize_run(cs, run, floor)
                    if keep:
                        baselines[mix_name(kinds)] = baseline_summary(run_baseline(hf, engine, run, keep, new_tokens))
                    configs.append(row)
                    log(config_line(row))
            for row in configs:
                b = baselines.get(row["mix"])
                row["baseline_serial_s_computed"] = row["clients"] * b["per_request_s"] if b and b["per_request_s"] else None
        if hf is not None:
            del hf
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        interference = None
        if interference_clients > 0:
            log(f"interference: {interference_clients} text streams of {interference_tokens} tokens, then + one {interference_frames}-frame clip")
            interference = run_interference(engine, interference_clients, interference_tokens, interference_frames, size,
                                            min(context_tokens, INTERFERENCE_CONTEXT), new_tokens, seed)
        report = {
            "env": environment(dev, tdtype),
            "workload": {"model": str(model), "clients": clients, "mixes": [mix_name(k) for k in mixes], "size": size,
                         "context_tokens": context_tokens, "new_tokens": new_tokens, "arrival": arrival, "rate": rate,
                         "baseline_requests": baseline_requests, "interference_clients": interference_clients,
                         "interference_tokens": interference_tokens, "interference_frames": interference_frames,
                         "warmup_clients": warmup_clients, "seed": seed, "engine_options": options,
                         "scheduling": scheduling_in_effect(engine.cfg)},
            "floor": floor,
            "configs": configs,
            "baseline": baselines,
            "interference": interference,
            "engine_stats": engine.stats(),
        }
        report["targets"] = check_targets(report)
        return report
    finally:
        engine.close()


def check_targets(r: dict) -> list[dict]:
    out = []
    for mix, n, key, op, bound, label in TARGETS:
        row = next((c for c in r["configs"] if c["mix"] == mix and c["clients"] == n and c["arrival"] == "burst"), None)
        value = row.get(key) if row else None
        ok = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out.append({"target": label, "metric": key, "value": value, "bound": bound, "ok": ok, "mix": mix, "clients": n})
    if r["interference"] is not None:
        v = r["interference"]["itl_p99_ratio"]
        out.append({"target": "interference ITL p99 ratio <= 2x", "metric": "itl_p99_ratio", "value": v, "bound": INTERFERENCE_TARGET,
                    "ok": None if v is None else v <= INTERFERENCE_TARGET, "mix": "interference", "clients": r["interference"]["with_clip"]["text_clients"]})
    return out


# ---------------------------------------------------------------------------------- output
def fmt_num(x, scale: float = 1.0, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x * scale:,.{digits}f}"


def target_mark(ok) -> str:
    return "n/a" if ok is None else ("ok" if ok else "MISSED")


def _target_note(row: dict) -> str:
    notes = []
    for mix, n, key, op, bound, label in TARGETS:
        if row["mix"] == mix and row["clients"] == n and row["arrival"] == "burst":
            v = row.get(key)
            notes.append(f"target {label}: {target_mark(None if v is None else (v >= bound if op == '>=' else v <= bound))}")
    return ("  [" + "; ".join(notes) + "]") if notes else ""


def config_line(row: dict) -> str:
    return (f"[{row['mix']} x{row['clients']} {row['arrival']}] {fmt_num(row['tokens_per_s'])} tok/s (floor {fmt_num(row['floor_tokens_per_s'])}), "
            f"TTFT p99 {fmt_num(row['ttft_p99_s'], 1000)} ms, batch {fmt_num(row['mean_running_batch'], digits=2)}")


def print_report(r: dict, out=None) -> None:
    env, w, floor = r["env"], r["workload"], r["floor"]
    where = env["gpu"] or f"CPU ({env['cpu']})"
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"omnistream bench concurrency: {w['model']} {env['dtype']} on {where}; torch {env['torch']}, transformers {env['transformers']}")
    arrival = w["arrival"] + (f" at {w['rate']} requests/s" if w["arrival"] == "poisson" else "")
    p(f"workload: clients {','.join(map(str, w['clients']))}; mixes {','.join(w['mixes']) or 'none'}; arrivals {arrival}; "
      f"text context ~{w['context_tokens']} tokens; clips {w['size']}x{w['size']}; {w['new_tokens']} new tokens per answer (greedy, no EOS)")
    if w.get("engine_options", {}).get("engine_process"):
        p("engine: its core in its own process (--engine-process); the clients' threads in this one")
    if w.get("scheduling"):
        p("scheduling while decoding: " + ", ".join(f"{k} {v}" for k, v in w["scheduling"].items()))
    p(f"decode floor: {floor['decoder_weight_bytes'] / 1e9:.3f} GB decoder+lm_head weights per step / {floor['bandwidth_bytes_per_s'] / 1e12:.3f} TB/s "
      f"measured copy bandwidth = {floor['decode_ms_per_token']:.3f} ms per step: N rows -> N / that tokens/s")
    for row in r["configs"]:
        b = r["baseline"].get(row["mix"])
        p("")
        p(f"[{row['mix']}, {row['clients']} client{'s' if row['clients'] > 1 else ''}, {row['arrival']}] prompt {fmt_num(row['mean_prompt_tokens'], digits=0)} tokens "
          f"(cached {fmt_num(row['mean_cached_tokens'], digits=0)}), {row['output_tokens']} output tokens in {fmt_num(row['wall_s'], 1000)} ms"
          f" (arrivals spread over {fmt_num(row.get('arrival_spread_s'), 1000, 1)} ms)")
        p(f"  omnistream  {fmt_num(row['tokens_per_s'])} tok/s; floor for {row['clients']} row{'s' if row['clients'] > 1 else ''} {fmt_num(row['floor_tokens_per_s'])} tok/s "
          f"(with KV reads {fmt_num(row['floor_with_kv_tokens_per_s'])}); {fmt_num(row['fraction_of_floor'], 100)}% of floor{_target_note(row)}")
        p(f"  TTFT ms p50/p90/p99 {fmt_num(row['ttft_p50_s'], 1000)} / {fmt_num(row['ttft_p90_s'], 1000)} / {fmt_num(row['ttft_p99_s'], 1000)}; "
          f"ITL ms p50/p99 {fmt_num(row['itl_p50_s'], 1000, 2)} / {fmt_num(row['itl_p99_s'], 1000, 2)} ({row['itl_samples']} intervals)")
        c = row["engine_counters"]
        p(f"  mean running batch {fmt_num(row['mean_running_batch'], digits=2)} seqs/step ({c['steps']} steps, {c['decode_steps']} sampling "
          f">1 sequence, {c['rows']} rows)" + (f"; add_video (outside TTFT) mean {fmt_num(row['add_video_mean_s'], 1000)} ms, max "
                                                f"{fmt_num(row['add_video_max_s'], 1000)} ms; vision encode mean {fmt_num(row['vision_encode_mean_s'], 1000)} ms"
                                                if row["add_video_mean_s"] is not None else ""))
        if b:
            eq = " ".join(f"{x['equal_tokens_to_engine']}/{x['compared_tokens']}" for x in b["requests"])
            p(f"  transformers one request at a time (measured on {b['requests_measured']} of the {max(w['clients'])}-client requests): "
              f"{fmt_num(b['per_request_s'], 1000)} ms per request (TTFT {fmt_num(b['ttft_mean_s'], 1000)} ms), {fmt_num(b['tokens_per_s'])} tok/s; "
              f"greedy tokens equal to the engine's: {eq}")
            what = "this request" if row["clients"] == 1 else f"these {row['clients']} requests one at a time"
            p(f"  transformers serving {what}: {fmt_num(row['baseline_serial_s_computed'], digits=3)} s "
              f"(computed: {row['clients']} x the measured per-request time, not run)")
    i = r["interference"]
    if i is not None:
        wo, wc = i["without_clip"], i["with_clip"]
        clip = wc["clip"]
        p("")
        p(f"[encoder interference] {wc['text_clients']} text streams of {wc['text_tokens']} tokens; one client asks about a "
          f"{clip['frames']}-frame {clip['size']}x{clip['size']} clip ({clip['video_tokens']} video tokens) once every stream has "
          f"{wc['stream_tokens_before_clip']} tokens")
        p(f"  clip TTFT {fmt_num(clip['ttft_s'], 1000)} ms (vision {fmt_num(clip['vision_encode_s'], 1000)} ms, prefill {fmt_num(clip['prefill_s'], 1000)} ms; "
          f"add_video {fmt_num(clip['add_video_s'], 1000)} ms outside it); streams still running at its first token {wc['streams_running_at_clip_first_token']}/{wc['text_clients']}")
        p(f"  text ITL ms p50/p99 while the clip is encoded/prefilled {fmt_num(wc['itl_window_p50_s'], 1000, 2)} / {fmt_num(wc['itl_window_p99_s'], 1000, 2)} "
          f"({len(wc['itl_window'])} intervals); without the clip {fmt_num(wo['itl_steady_p50_s'], 1000, 2)} / {fmt_num(wo['itl_steady_p99_s'], 1000, 2)} "
          f"({len(wo['itl_steady'])} intervals); outside the window {fmt_num(wc['itl_outside_window_p50_s'], 1000, 2)} / {fmt_num(wc['itl_outside_window_p99_s'], 1000, 2)}")
        p(f"  ratio p50 {fmt_num(i['itl_p50_ratio'], digits=2)}x, p99 {fmt_num(i['itl_p99_ratio'], digits=2)}x "
          f"[target p99 ratio <= {INTERFERENCE_TARGET:g}x: {target_mark(None if i['itl_p99_ratio'] is None else i['itl_p99_ratio'] <= INTERFERENCE_TARGET)}]")
    print_table(r, out)


def print_table(r: dict, out=None) -> None:
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p("")
    p("W3 summary (one line per configuration; tf = transformers one request at a time, serial s computed from its measured per-request time)")
    p(f"{'mix':<14}{'N':>4} {'arrival':<8}{'tok/s':>10}{'floor':>10}{'TTFT p50':>10}{'p90':>8}{'p99 ms':>8}{'ITL p50':>9}{'p99 ms':>8}"
      f"{'batch':>7}{'tf tok/s':>10}{'tf serial s':>12}")
    for row in r["configs"]:
        b = r["baseline"].get(row["mix"])
        p(f"{row['mix']:<14}{row['clients']:>4} {row['arrival']:<8}{fmt_num(row['tokens_per_s'], digits=0):>10}{fmt_num(row['floor_tokens_per_s'], digits=0):>10}"
          f"{fmt_num(row['ttft_p50_s'], 1000):>10}{fmt_num(row['ttft_p90_s'], 1000):>8}{fmt_num(row['ttft_p99_s'], 1000):>8}"
          f"{fmt_num(row['itl_p50_s'], 1000, 2):>9}{fmt_num(row['itl_p99_s'], 1000, 2):>8}{fmt_num(row['mean_running_batch'], digits=2):>7}"
          f"{fmt_num(b['tokens_per_s'] if b else None):>10}{fmt_num(row['baseline_serial_s_computed'], digits=2):>12}")
    i = r["interference"]
    if i is not None:
        wc, wo = i["with_clip"], i["without_clip"]
        p(f"{'interference':<14}{wc['text_clients']:>4} {'+clip':<8} text ITL p50/p99 ms {fmt_num(wc['itl_window_p50_s'], 1000, 2)}/{fmt_num(wc['itl_window_p99_s'], 1000, 2)} "
          f"with the clip vs {fmt_num(wo['itl_steady_p50_s'], 1000, 2)}/{fmt_num(wo['itl_steady_p99_s'], 1000, 2)} without: p99 ratio {fmt_num(i['itl_p99_ratio'], digits=2)}x")
    env, w = r["env"], r["workload"]
    note = "" if (str(w["model"]) == "3b" and env["gpu"]) else f" (set for 3B on an H200; this run is {w['model']} on {env['gpu'] or 'CPU'}: indicative only)"
    p(f"targets{note}:")
    for t in r["targets"]:
        seconds = t["metric"].endswith("_s") and not t["metric"].endswith("_per_s")  # tokens_per_s is a rate
        scale, unit = (1000, " ms") if seconds else (1, "x" if "ratio" in t["metric"] else " tok/s")
        if t["value"] is None:
            p(f"  {t['target']:<40} {'(not in this run)':>17}")
        else:
            p(f"  {t['target']:<40} {fmt_num(t['value'], scale, 2 if unit == 'x' else 0) + unit:>17}  {target_mark(t['ok'])}")


def _progress(line: str) -> None:
    """Progress while it runs, on stderr: stdout holds the report alone (`> report.txt`)."""
    print(line, file=sys.stderr, flush=True)


def cmd_concurrency(args) -> int:
    from omnistream.entrypoints.options import default_device
    from omnistream.entrypoints.options import check_engine_options, engine_options

    if args.new_tokens < 2:
        raise SystemExit("error: --new-tokens must be >= 2 (inter-token latency needs two tokens)")
    if args.arrival == "poisson" and not (args.rate and args.rate > 0):
        raise SystemExit("error: --arrival poisson needs --rate R > 0 (requests/s)")
    mixes = [] if args.interference_only else parse_mixes(args.mix)
    if not mixes and args.interference_clients < 1:
        raise SystemExit("error: nothing to run (--interference-only with --interference-clients 0)")
    device, opts = default_device(args.device), engine_options(args)
    check_engine_options(device, args.dtype, opts)  # a bad flag before any model is built, named as the flag
    report = run_concurrency(model_arg(args), device, args.dtype, parse_clients(args.clients), mixes, args.size,
                             args.context_tokens, args.new_tokens, args.arrival, args.rate, args.baseline_requests,
                             args.interference_clients, args.interference_tokens, args.interference_frames, args.warmup_clients,
                             args.seed, engine_opts=opts, log=_progress)
    print_report(report)
    write_json(report, args.json)
    return 0
