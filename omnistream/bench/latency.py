"""`omnistream bench latency`: one video question, transformers vs omnistream, in one run.

Systems, all on the same generated clip and the same preprocessed pixels:
  transformers        eager forward (sdpa), DynamicCache, greedy loop with explicit M-RoPE
                      positions (what `generate` does, minus logits processors)
  transformers tuned  the same prefill, then decode through a static KV cache and
                      `torch.compile(mode="reduce-overhead")` (gpt-fast recipe); n/a on failure
  omnistream          Engine.generate (paged KV, Triton decode, CUDA graphs on GPU)

Rows: vision encode, TTFT (preprocessing excluded: the baseline gets pixels too), decode
ms/token, peak memory. The decode floor is decoder + lm_head weight bytes / measured device
copy bandwidth. Each repeat uses a fresh clip (seed + repeat) so no cache can serve it; each
system is warmed up once first; medians are reported.
"""

from __future__ import annotations

import gc
import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from omnistream.bench.flops import encoder_flops, matmul_peak_flops, prefill_flops
from omnistream.bench.models import make_pair, resolve_dtype
from omnistream.bench.stats import ratio
from omnistream.bench.workload import video_question, video_tokens
from omnistream.engine.sampling import SamplingParams
from omnistream.media.patchify import normalize_rows
from omnistream.models.mrope import mrope_positions
from omnistream.models.prompt import build_prompt

HOST_PREPROCESS_TARGET_S = 0.030  # issue 11: resize + patchify + hash of 64 448x448 frames on the host

ROWS = ("vision_encode_s", "ttft_s", "decode_ms_per_token", "peak_gib")
AGREE_TOKENS = 16
WARMUP_SEED_OFFSET = 1000


# ---------------------------------------------------------------------------------- timing
def now(device: torch.device) -> float:
    """Wall clock after all queued device work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def median(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


class MemoryMeter:
    """Peak device memory of one system while another system's weights are also resident:
    peak = (max allocated during the run - allocated before it) + the system's resident bytes
    (weights + whatever its warm-up left allocated: KV pool, static cache, graph pools)."""

    def __init__(self, device: torch.device, static_bytes: int) -> None:
        self.device, self.resident = device, static_bytes
        self.cuda = device.type == "cuda"

    def _allocated(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.memory_allocated(self.device)

    def warmup(self, fn):
        """Runs the warm-up; what it leaves allocated counts as this system's resident memory."""
        before = self._allocated() if self.cuda else 0
        out = fn()
        if self.cuda:
            self.resident += self._allocated() - before
        return out

    def measure(self, fn):
        """-> (fn(), peak bytes or None on CPU)."""
        if not self.cuda:
            return fn(), None
        before = self._allocated()
        torch.cuda.reset_peak_memory_stats(self.device)
        out = fn()
        torch.cuda.synchronize(self.device)
        return out, torch.cuda.max_memory_allocated(self.device) - before + self.resident


def tensor_bytes(tensors) -> int:
    """Bytes of distinct tensors (tied weights once). A model shape on the meta device (the
    front-end of an engine in its own process) has no addresses: there the objects count."""
    seen, total = set(), 0
    for t in tensors:
        key = id(t) if t.is_meta else t.data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------------- inputs
@dataclass
class Prepared:
    """One conversation preprocessed once; every system sees these pixels and tokens."""

    messages: list[dict]
    prompt_ids: list[int]
    positions: torch.Tensor  # (3, L) M-RoPE positions by the original rule
    next_pos: int  # position of the first generated token
    hf_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # pixel_values_videos, grids (CPU)


def prepare(engine, messages: list[dict]) -> Prepared:
    items = engine.load_media(messages)
    prompt = build_prompt(engine.tokenizer, messages, items)
    media = [(r.offset, m) for r, m in zip(prompt.ranges, prompt.media)]
    positions, next_pos = mrope_positions(len(prompt.token_ids), media, engine.model.cfg.vision.tokens_per_second)
    videos = [m for m in items if m.kind == "video"]
    hf_inputs = {
        # transformers takes normalised float rows (its processor's output); ours stay uint8
        "pixel_values_videos": torch.cat([normalize_rows(m.pixel_values) for m in videos]),
        "video_grid_thw": torch.tensor([m.grid_thw for m in videos]),
        "second_per_grid_ts": torch.tensor([m.second_per_grid_t for m in videos]),
    }
    return Prepared(messages, prompt.token_ids, positions, next_pos, hf_inputs)


# ---------------------------------------------------------------------------- transformers
@torch.no_grad()  # what generate() uses (inference tensors would break the static cache's reset)
def hf_vision(hf, p: Prepared, device: torch.device) -> float:
    """Seconds of the vision tower on the clip, host-to-device copy of the pixels included."""
    t0 = now(device)
    pixels = p.hf_inputs["pixel_values_videos"].to(device, non_blocking=True)
    hf.model.get_video_features(pixels, p.hf_inputs["video_grid_thw"].to(device))
    return now(device) - t0


@torch.no_grad()
def hf_greedy(hf, p: Prepared, device: torch.device, new_tokens: int, cache, step=None, first_logits: bool = False) -> dict:
    """Prefill (vision included) + greedy decode with explicit positions.
    step: the callable for decode steps (the compiled forward for the tuned variant).
    first_logits: also return the first token's logits (float32, host), copied after timing."""
    step = step or hf
    t0 = now(device)
    kwargs = {k: v.to(device, non_blocking=True) for k, v in p.hf_inputs.items()}
    ids = torch.tensor([p.prompt_ids], device=device)
    out = hf(input_ids=ids, position_ids=p.positions[:, None].to(device), past_key_values=cache, use_cache=True, logits_to_keep=1, **kwargs)
    first = out.logits[0, -1]
    tok = first.argmax()
    tokens = [tok.item()]  # the host needs every token (streaming, stop checks), like generate
    t_first = time.perf_counter()
    for i in range(1, new_tokens):
        pos = torch.full((3, 1, 1), p.next_pos + i - 1, dtype=torch.long, device=device)
        out = step(input_ids=tok.view(1, 1), position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = out.logits[0, -1].argmax()
        tokens.append(tok.item())
    t_end = time.perf_counter()
    decode = (t_end - t_first) * 1000 / (new_tokens - 1) if new_tokens > 1 else None
    r = {"ttft_s": t_first - t0, "decode_ms_per_token": decode, "tokens": tokens}
    if first_logits:
        r["first_logits"] = first.float().cpu()
    return r


class HFDefault:
    name = "transformers"

    def __init__(self, hf, device: torch.device, new_tokens: int) -> None:
        self.hf, self.device, self.new_tokens = hf, device, new_tokens

    def vision(self, p: Prepared) -> float | None:
        return hf_vision(self.hf, p, self.device)

    def request(self, p: Prepared) -> dict:
        from transformers import DynamicCache

        return hf_greedy(self.hf, p, self.device, self.new_tokens, DynamicCache(config=self.hf.config))


class HFTuned(HFDefault):
    """Static KV cache sized for the prompt + new tokens, decode steps through the forward
    compiled with mode="reduce-overhead" (CUDA graphs). The cache is reused across requests
    (reset, not reallocated) so the compiled graphs stay valid."""

    name = "transformers_tuned"

    def __init__(self, hf, device: torch.device, new_tokens: int, max_len: int) -> None:
        super().__init__(hf, device, new_tokens)
        from transformers import StaticCache
        from transformers.generation import CompileConfig

        self.cache = StaticCache(config=hf.config, max_cache_len=max_len)
        self.step = hf.get_compiled_call(CompileConfig(fullgraph=False, mode="reduce-overhead"))

    def vision(self, p: Prepared) -> float | None:
        return None  # same eager vision tower as the default

    def request(self, p: Prepared) -> dict:
        self.cache.reset()
        return hf_greedy(self.hf, p, self.device, self.new_tokens, self.cache, self.step)


# ---------------------------------------------------------------------------------- engine
class EngineSystem:
    name = "omnistream"

    def __init__(self, engine, new_tokens: int) -> None:
        self.engine = engine
        self.sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)

    def vision(self, p: Prepared) -> float | None:
        return None  # taken from the request's metrics

    def request(self, p: Prepared) -> dict:
        [res] = self.engine.generate([p.messages], self.sampling)
        m = res.metrics
        tps = m.decode_tokens_per_s
        return {
            "vision_encode_s": m.vision_encode_s,
            "ttft_s": m.ttft_s - m.media_decode_s - m.preprocess_s,
            "ttft_with_preprocess_s": m.ttft_s,
            "preprocess_s": m.media_decode_s + m.preprocess_s,
            "media_decode_s": m.media_decode_s,  # PyAV
            "host_preprocess_s": m.preprocess_s,  # resize + patchify + hash (normalisation is on the device)
            "decode_ms_per_token": 1000 / tps if tps else None,
            "tokens": res.token_ids,
        }


def run_system(system, meter: MemoryMeter, warm: Prepared, clips: list[Prepared]) -> dict:
    """Warm-up once, then one request per clip -> medians + raw samples."""
    meter.warmup(lambda: (system.vision(warm), system.request(warm)))
    raw: dict[str, list] = {}
    for p in clips:
        vision = system.vision(p)
        res, peak = meter.measure(lambda: system.request(p))
        res.setdefault("vision_encode_s", vision)
        res["peak_gib"] = None if peak is None else peak / 2**30
        for k, v in res.items():
            raw.setdefault(k, []).append(v)
    summary = {k: median(v) for k, v in raw.items() if k != "tokens"}
    summary["tokens"] = raw["tokens"][0]
    summary["raw"] = {k: v for k, v in raw.items() if k != "tokens"}
    summary["status"] = "ok"
    return summary


def run_tuned(hf, device, new_tokens, max_len, warm, clips, hf_bytes, mode: str) -> dict:
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        why = "disabled (--tuned off)" if mode == "off" else "skipped on CPU (torch.compile of the model is slow there; --tuned on forces it)"
        return {"status": "n/a", "reason": why}
    system = None
    try:
        system = HFTuned(hf, device, new_tokens, max_len)
        return run_system(system, MemoryMeter(device, hf_bytes), warm, clips)
    except Exception as e:  # compile failures come in many types; report, don't abort the bench
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        print(f"transformers tuned: n/a ({reason})")
        return {"status": "n/a", "reason": reason}
    finally:
        del system
        _release(device)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------- floor
def measure_bandwidth(device: torch.device, repeats: int = 9) -> tuple[float, list[float]]:
    """Device memory bandwidth (bytes/s) from a large copy: bytes read + written / time,
    median of `repeats` copies (1 GiB on CUDA, 256 MiB on CPU)."""
    n = (1 << 30) if device.type == "cuda" else (1 << 28)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up (page faults on CPU)
    samples = []
    for _ in range(repeats):
        t0 = now(device)
        dst.copy_(src)
        samples.append(2 * n / (now(device) - t0))
    del src, dst
    _release(device)
    return statistics.median(samples), samples


def decode_floor(model, bandwidth: float, context: int) -> dict:
    """Bytes one decode step must read at least: decoder layers + final norm + lm_head (the
    vision tower and the embedding table, one row per token, are not read), and the KV cache."""
    weights = tensor_bytes(p for m in (model.model.layers, model.model.norm, model.lm_head) for p in m.parameters())
    t = model.cfg.text
    kv = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * next(model.parameters()).element_size() * context
    return {
        "bandwidth_bytes_per_s": bandwidth,
        "decoder_weight_bytes": weights,
        "kv_bytes_at_context": kv,
        "context_tokens": context,
        "decode_ms_per_token": weights / bandwidth * 1000,
        "decode_ms_per_token_with_kv": (weights + kv) / bandwidth * 1000,
    }


# ---------------------------------------------------------------------------------- driver
def environment(device: torch.device, dtype: torch.dtype) -> dict:
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "device": str(device),
        "gpu": gpu,
        "cpu": platform.processor() or platform.machine(),
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": tf_version,
        "python": platform.python_version(),
    }


def agreement(a: list[int], b: list[int], n: int = AGREE_TOKENS) -> dict:
    a, b = a[:n], b[:n]
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {"compared": min(len(a), len(b)), "matching_prefix": prefix, "equal_positions": sum(x == y for x, y in zip(a, b))}


def run_latency(model_config: str, device: str, dtype: str, frames: int, size: int, new_tokens: int, repeats: int, tuned: str = "auto", seed: int = 0) -> dict:
    dev, tdtype = torch.device(device), resolve_dtype(dtype, device)
    if dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
        device = str(dev)
    kv_tokens = video_tokens(frames, size) + new_tokens + 1024  # prompt text is a few dozen tokens
    hf, engine = make_pair(model_config, device, tdtype, seed, kv_cache_tokens=kv_tokens)
    hf_bytes = tensor_bytes(list(hf.parameters()) + list(hf.buffers()))
    total = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    warm = prepare(engine, video_question(frames, size, seed + WARMUP_SEED_OFFSET))
    clips = [prepare(engine, video_question(frames, size, seed + r)) for r in range(repeats)]
    max_len = len(clips[0].prompt_ids) + new_tokens
    systems = {"transformers": run_system(HFDefault(hf, dev, new_tokens), MemoryMeter(dev, hf_bytes), warm, clips)}
    _release(dev)
    systems["transformers_tuned"] = run_tuned(hf, dev, new_tokens, max_len, warm, clips, hf_bytes, tuned)
    systems["omnistream"] = run_system(EngineSystem(engine, new_tokens), MemoryMeter(dev, total - hf_bytes), warm, clips)
    bw, bw_samples = measure_bandwidth(dev)
    floor = decode_floor(engine.model, bw, len(clips[0].prompt_ids) + new_tokens // 2)
    floor["bandwidth_samples"] = bw_samples
    base, ours = systems["transformers"], systems["omnistream"]
    work = stage_work(engine, clips[0], dev, tdtype)
    return {
        "env": environment(dev, tdtype),
        "workload": {
            "model": str(model_config), "frames": frames, "size": size, "fps": 2.0, "new_tokens": new_tokens,
            "repeats": repeats, "seed": seed, "prompt_tokens": len(clips[0].prompt_ids), "video_tokens": video_tokens(frames, size),
            "engine_kv_cache_tokens": kv_tokens,
        },
        "systems": systems,
        "ratios": {k: ratio(base.get(k), ours.get(k)) for k in ROWS},
        "ratios_tuned": {k: ratio(systems["transformers_tuned"].get(k), ours.get(k)) for k in ROWS},
        "floor": floor,
        "work": work,
        "rates": {name: stage_rates(systems[name], work, floor) for name in systems if systems[name].get("status") == "ok"},
        "agreement": agreement(base["tokens"], ours["tokens"]),
        "agreement_tuned": agreement(base["tokens"], systems["transformers_tuned"]["tokens"]) if "tokens" in systems["transformers_tuned"] else None,
    }


def stage_work(engine, p: Prepared, device: torch.device, dtype: torch.dtype) -> dict:
    """FLOPs of the clip's vision forward and of its prompt's prefill, and the measured matmul peak."""
    pixels = p.hf_inputs["pixel_values_videos"]
    grids = [tuple(g) for g in p.hf_inputs["video_grid_thw"].tolist()]
    vision = encoder_flops(engine.model.media_encoder("video"), pixels.shape[0], pixels.shape[1], grids, device, dtype)
    return {"vision_flops": vision, "prefill_flops": prefill_flops(engine.model.cfg.text, len(p.prompt_ids)),
            "matmul_peak_flops_per_s": matmul_peak_flops(device, dtype)}


def stage_rates(system: dict, work: dict, floor: dict) -> dict:
    """Achieved TFLOP/s of vision and prefill (TTFT less vision), their share of the matmul peak,
    and the decode step's share of the measured copy bandwidth (weights + KV per token)."""
    vision, ttft, decode = system.get("vision_encode_s"), system.get("ttft_s"), system.get("decode_ms_per_token")
    peak = work["matmul_peak_flops_per_s"]
    v = work["vision_flops"] / vision / 1e12 if vision else None
    prefill_s = ttft - vision if ttft and vision and ttft > vision else None
    pf = work["prefill_flops"] / prefill_s / 1e12 if prefill_s else None
    return {"vision_tflops": v, "vision_of_peak": v * 1e12 / peak if v else None,
            "prefill_tflops": pf, "prefill_of_peak": pf * 1e12 / peak if pf else None,
            "decode_of_bandwidth": floor["decode_ms_per_token_with_kv"] / decode if decode else None}


# ---------------------------------------------------------------------------------- output
def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def print_report(r: dict, out=None) -> None:
    env, w, s, floor = r["env"], r["workload"], r["systems"], r["floor"]
    where = env["gpu"] or f"CPU ({env['cpu']})"
    print(f"omnistream bench latency: {w['model']} {env['dtype']} on {where}; torch {env['torch']}, transformers {env['transformers']}", file=out)
    print(f"workload: {w['frames']} frames {w['size']}x{w['size']} ({w['video_tokens']} video tokens, prompt {w['prompt_tokens']}), "
          f"{w['new_tokens']} new tokens, median of {w['repeats']}", file=out)
    cols = ("transformers", "transformers_tuned", "omnistream")
    print(f"{'':<18}{'transformers':>13}{'tf tuned':>10}{'omnistream':>12}{'ratio':>8}{'floor':>8}", file=out)
    for key, label in zip(ROWS, ("vision encode s", "TTFT s", "decode ms/token", "peak GiB")):
        vals = "".join(f"{_fmt(s[c].get(key)):>{wd}}" for c, wd in zip(cols, (13, 10, 12)))
        x = r["ratios"][key]
        fl = _fmt(floor["decode_ms_per_token"]) if key == "decode_ms_per_token" else ""
        print(f"{label:<18}{vals}{(_fmt(x, 2) + 'x') if x else 'n/a':>8}{fl:>8}", file=out)
    if s["transformers_tuned"]["status"] != "ok":
        print(f"transformers tuned: n/a ({s['transformers_tuned']['reason']})", file=out)
    o = s["omnistream"]
    host = o.get("host_preprocess_s")
    mark = "" if host is None else f"  [host preprocessing <= {HOST_PREPROCESS_TARGET_S * 1000:.0f} ms: {'ok' if host <= HOST_PREPROCESS_TARGET_S else 'MISSED'}]"
    print(f"omnistream host work before the engine (excluded from TTFT): {_fmt(o.get('preprocess_s'))} s = decode "
          f"{_fmt(o.get('media_decode_s'))} s + preprocessing (resize, patchify, hash) {_fmt(host)} s{mark}", file=out)
    print(f"decode floor: {floor['decoder_weight_bytes'] / 1e9:.3f} GB decoder+lm_head weights / {floor['bandwidth_bytes_per_s'] / 1e12:.3f} TB/s "
          f"measured copy bandwidth; with KV reads at {floor['context_tokens']} tokens: {_fmt(floor['decode_ms_per_token_with_kv'])} ms", file=out)
    work = r.get("work")
    if work:
        print(f"work: vision {work['vision_flops'] / 1e12:.2f} TFLOP (counted; kernels torch cannot see count 0), prefill "
              f"{work['prefill_flops'] / 1e12:.2f} TFLOP (from the config); measured matmul peak "
              f"{work['matmul_peak_flops_per_s'] / 1e12:.0f} TFLOP/s", file=out)
        pct = lambda x: "n/a" if x is None else f"{100 * x:.0f}%"  # noqa: E731
        for name, rt in r["rates"].items():
            print(f"  {name:<20} vision {_fmt(rt['vision_tflops'], 1)} TFLOP/s ({pct(rt['vision_of_peak'])} of peak), prefill "
                  f"{_fmt(rt['prefill_tflops'], 1)} TFLOP/s ({pct(rt['prefill_of_peak'])}), decode at "
                  f"{pct(rt['decode_of_bandwidth'])} of the copy bandwidth", file=out)
    for label, a in (("omnistream", r["agreement"]), ("transformers tuned", r["agreement_tuned"])):
        if a:  # tuned vs default shows how far rounding alone moves greedy tokens (bf16, random weights)
            print(f"greedy agreement transformers vs {label} (first {a['compared']} tokens): "
                  f"{a['matching_prefix']}/{a['compared']} matching prefix, {a['equal_positions']}/{a['compared']} equal", file=out)


def cmd_latency(args) -> int:
    from omnistream.entrypoints.options import default_device

    model = args.model_config or ("demo" if args.model == "demo" else args.model)
    report = run_latency(model, default_device(args.device), args.dtype, args.frames, args.size, args.new_tokens, args.repeats, args.tuned, args.seed)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0
