"""`omnistream bench accuracy`: how close is the engine in bf16 to transformers in float32,
compared with transformers' own bf16 error? With `--weight-quant int8|fp8`, also the 8-bit
small-GPU mode (layers/quant.py) beside it.

One video prompt plus a continuation of `--new-tokens` (transformers float32's own greedy
tokens), fed teacher-forced: each engine prefills the prompt and then decodes each forced token
through its real decode path (paged KV, decode kernel, CUDA graphs), keeping the logits of every
step. Reported per system: mean and max relative logit error against float32 and top-1
agreement; the 8-bit engine also against the bf16 engine (what the quantization alone changes).
Each engine's decode ms/token (a free greedy answer of the same length after the teacher-forced
run, median of DECODE_REPEATS), its weight bytes and its peak device memory during that answer
(weights + KV pool + activations, other systems on the card excluded) come beside it.
"""

from __future__ import annotations

import json
import time

import torch

from omnistream.bench.latency import MemoryMeter, median, tensor_bytes
from omnistream.bench.native import native_inputs
from omnistream.engine.protocol import EngineRequest
from omnistream.engine.sampling import SamplingParams
from omnistream.layers.quant import triton_kernel_in_use

DECODE_REPEATS = 3
KV_CACHE_TOKENS = 16384  # each engine's pool: the prompt (16 frames: ~2.1k tokens) and its answers


@torch.inference_mode()
def hf_teacher_forced(hf, prompt_ids, media, cont, device, dtype) -> torch.Tensor:
    """logits (len(cont), V) predicting cont[i] from prompt + cont[:i]."""
    ids = list(prompt_ids) + list(cont[:-1])
    p = native_inputs(prompt_ids, media, hf.config.vision_config.tokens_per_second)
    pos = torch.cat([p.positions, torch.arange(p.next_pos, p.next_pos + len(cont) - 1).expand(3, -1)], dim=1)
    kw = {k: v.to(device) for k, v in p.hf_inputs.items()}
    kw["pixel_values_videos"] = kw["pixel_values_videos"].to(dtype)
    out = hf(input_ids=torch.tensor([ids], device=device), position_ids=pos[:, None, :].to(device), **kw)
    return out.logits[0, len(prompt_ids) - 1 :].float()


@torch.inference_mode()
def hf_greedy(hf, prompt_ids, media, n, device, dtype) -> list[int]:
    cont: list[int] = [0]
    for _ in range(n):  # re-run the full sequence each time: simple, exact, fine for n=64 once
        logits = hf_teacher_forced(hf, prompt_ids, media, cont, device, dtype)
        cont[-1] = int(logits[-1].argmax())
        cont.append(0)
    return cont[:-1]


def engine_teacher_forced(engine, prompt_ids, media, cont) -> torch.Tensor:
    """(len(cont), vocab) logits of the engine fed `cont` instead of its own samples."""
    [res] = engine.run([EngineRequest(prompt_ids, media, SamplingParams(max_new_tokens=len(cont), ignore_eos=True),
                                      return_logits=True, forced_output=list(cont))])
    return torch.stack(res.logits).float()


def compare(ref: torch.Tensor, other: torch.Tensor) -> dict:
    rel = ((other.cpu() - ref.cpu()).norm(dim=-1) / ref.cpu().norm(dim=-1))
    agree = (other.cpu().argmax(-1) == ref.cpu().argmax(-1)).float().mean()
    return {"rel_err_mean": rel.mean().item(), "rel_err_max": rel.max().item(), "top1_agree": agree.item()}


def decode_run(engine, prompt_ids, media, n: int, meter: MemoryMeter) -> dict:
    """Greedy answers of n tokens (EOS ignored) -> median decode ms/token and the peak bytes of
    the runs (None on the CPU)."""
    ms, peaks = [], []
    for _ in range(DECODE_REPEATS):
        [res], peak = meter.measure(lambda: engine.run([EngineRequest(prompt_ids, media, SamplingParams(max_new_tokens=n, ignore_eos=True))]))
        tps = res.metrics.decode_tokens_per_s
        ms.append(1000 / tps if tps else None)
        peaks.append(peak)
    return {"decode_ms_per_token": median(ms), "peak_bytes": max(peaks) if peaks[0] is not None else None}


def _build_engine(cfg, model_class, hf, dev_name: str, dtype: torch.dtype, weight_quant: str | None):
    """-> (Engine holding hf's weights rounded to dtype, 8-bit with weight_quant; its resident
    device bytes: weights, KV pool, graphs)."""
    from omnistream.bench.models import _engine_for_preset
    from omnistream.entrypoints.api import build_model
    from omnistream.models.loader import load_state

    device = torch.device(dev_name)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    ours = build_model(model_class, cfg, device, dtype)
    load_state(ours, hf.state_dict().items())
    options = {"kv_cache_tokens": KV_CACHE_TOKENS} | ({"weight_quant": weight_quant} if weight_quant else {})
    engine = _engine_for_preset(ours, dev_name, dtype, options)
    resident = torch.cuda.memory_allocated(device) - before if device.type == "cuda" else 0
    return engine, resident


def _engine_row(name: str, engine, resident: int, logits: torch.Tensor, ref32: torch.Tensor, prompt_ids, media, n: int) -> dict:
    meter = MemoryMeter(engine.device, resident)
    return {"name": name, "vs_float32": compare(ref32, logits), **decode_run(engine, prompt_ids, media, n, meter),
            "weight_bytes": tensor_bytes(engine.model.parameters())}


def run_accuracy(args) -> dict:
    from omnistream.bench.models import _preset, _random_hf_model, resolve_dtype
    from omnistream.bench.workload import video_question
    from omnistream.models.prompt import build_prompt

    dev_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev_name)
    dtype = resolve_dtype(args.dtype, dev_name)
    quant = getattr(args, "weight_quant", None)
    cfg, model_class = _preset(args.model_config or "tiny")
    hf = _random_hf_model(cfg, dev_name, torch.float32, args.seed)  # the float32 reference
    engine, resident = _build_engine(cfg, model_class, hf, dev_name, dtype, None)
    conv = video_question(args.frames, args.size, args.seed, "Describe the video in detail.")
    items = engine.load_media(conv)
    prompt = build_prompt(engine.tokenizer, conv, items)
    media = [(r.offset, m) for r, m in zip(prompt.ranges, prompt.media)]
    ids = prompt.token_ids
    t0 = time.perf_counter()
    cont = hf_greedy(hf, ids, media, args.new_tokens, device, torch.float32)
    ref32 = hf_teacher_forced(hf, ids, media, cont, device, torch.float32)
    dname = str(dtype).replace("torch.", "")
    base = engine_teacher_forced(engine, ids, media, cont)
    rows = [_engine_row(f"omnistream {dname}", engine, resident, base, ref32, ids, media, len(cont))]
    engine.close()
    del engine
    if quant:
        qengine, qresident = _build_engine(cfg, model_class, hf, dev_name, dtype, quant)
        qlogits = engine_teacher_forced(qengine, ids, media, cont)
        rows.append(_engine_row(f"omnistream {dname}+{quant}", qengine, qresident, qlogits, ref32, ids, media, len(cont))
                    | {"vs_engine": compare(base, qlogits), "triton_kernel": device.type == "cuda" and triton_kernel_in_use()})
        qengine.close()
    hf.to(torch.bfloat16)
    ref16 = hf_teacher_forced(hf, ids, media, cont, device, torch.bfloat16)
    result = {
        "prompt_tokens": len(ids), "positions": len(cont), "engine_dtype": dname, "weight_quant": quant,
        "transformers_bf16": compare(ref32, ref16),
        "omnistream": rows[0]["vs_float32"],
        "engines": rows,
        "seconds": time.perf_counter() - t0,
    }
    result["error_ratio"] = rows[0]["vs_float32"]["rel_err_mean"] / max(result["transformers_bf16"]["rel_err_mean"], 1e-12)
    print_accuracy(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f}"


def print_accuracy(r: dict) -> None:
    print(f"accuracy vs transformers float32 over {r['positions']} teacher-forced positions (prompt {r['prompt_tokens']} tokens)")
    print(f"{'system':<28}{'rel err mean':>14}{'rel err max':>14}{'top-1 agree':>13}{'decode ms/tok':>15}{'weights GiB':>13}{'peak GiB':>10}")
    a = r["transformers_bf16"]
    print(f"{'transformers bfloat16':<28}{a['rel_err_mean']:>14.3e}{a['rel_err_max']:>14.3e}{a['top1_agree']:>13.3f}{'-':>15}{'-':>13}{'-':>10}")
    for row in r["engines"]:
        e, ms = row["vs_float32"], row["decode_ms_per_token"]
        print(f"{row['name']:<28}{e['rel_err_mean']:>14.3e}{e['rel_err_max']:>14.3e}{e['top1_agree']:>13.3f}"
              f"{'n/a' if ms is None else f'{ms:.2f}':>15}{_gib(row['weight_bytes']):>13}{_gib(row['peak_bytes']):>10}")
    print(f"omnistream error / transformers bf16 error = {r['error_ratio']:.2f} (target <= 1.5)")
    for row in r["engines"][1:]:
        v, base = row["vs_engine"], r["engines"][0]
        err = row["vs_float32"]["rel_err_mean"]
        print(f"{row['name']} vs {base['name']} (teacher-forced on the same tokens): rel err mean {v['rel_err_mean']:.3e}, "
              f"top-1 agree {v['top1_agree']:.3f}; its error vs float32 is {err / max(a['rel_err_mean'], 1e-12):.2f}x "
              f"transformers bfloat16's and {err / max(base['vs_float32']['rel_err_mean'], 1e-12):.2f}x {base['name']}'s; "
              f"decode rows through the 8-bit Triton kernel: {'yes' if row['triton_kernel'] else 'no'}")
