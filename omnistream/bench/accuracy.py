"""`omnistream bench accuracy`: how close is the engine in bf16 to transformers in float32,
compared with transformers' own bf16 error?

One video prompt plus a 64-token continuation (transformers float32's own greedy tokens), fed
teacher-forced: the engine prefills the prompt and then decodes each forced token through its
real decode path (paged KV, decode kernel, CUDA graphs), keeping the logits of every step.
Reported per system: mean relative logit error against float32 and top-1 agreement.
"""

from __future__ import annotations

import json
import time

import torch

from omnistream.bench.native import native_inputs
from omnistream.engine.protocol import EngineRequest
from omnistream.engine.sampling import SamplingParams


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


def run_accuracy(args) -> dict:
    from omnistream.entrypoints.api import build_model
    from omnistream.bench.models import _engine_for_preset, _random_hf_model, resolve_dtype
    from omnistream.bench.workload import video_question
    from omnistream.models.hf_config import preset_config
    from omnistream.models.loader import load_state
    from omnistream.models.prompt import build_prompt

    dev_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev_name)
    dtype = resolve_dtype(args.dtype, dev_name)
    cfg = preset_config(args.model_config or "tiny")
    hf = _random_hf_model(cfg, dev_name, torch.float32, args.seed)  # the float32 reference
    ours = build_model(cfg, device, dtype)
    load_state(ours, hf.state_dict().items())  # the same weights, rounded to the engine's dtype
    engine = _engine_for_preset(ours, dev_name, dtype, {"kv_cache_tokens": 65536})
    conv = video_question(args.frames, args.size, args.seed, "Describe the video in detail.")
    items = engine.load_media(conv)
    prompt = build_prompt(engine.tokenizer, conv, items)
    media = [(r.offset, m) for r, m in zip(prompt.ranges, prompt.media)]
    t0 = time.perf_counter()
    cont = hf_greedy(hf, prompt.token_ids, media, args.new_tokens, device, torch.float32)
    ref32 = hf_teacher_forced(hf, prompt.token_ids, media, cont, device, torch.float32)
    ours = engine_teacher_forced(engine, prompt.token_ids, media, cont)
    hf.to(torch.bfloat16)
    ref16 = hf_teacher_forced(hf, prompt.token_ids, media, cont, device, torch.bfloat16)
    result = {
        "prompt_tokens": len(prompt.token_ids),
        "positions": len(cont),
        "engine_dtype": str(engine.cfg.torch_dtype),
        "transformers_bf16": compare(ref32, ref16),
        "omnistream": compare(ref32, ours),
        "seconds": time.perf_counter() - t0,
    }
    a, b = result["transformers_bf16"], result["omnistream"]
    result["error_ratio"] = b["rel_err_mean"] / max(a["rel_err_mean"], 1e-12)
    print(f"accuracy vs transformers float32 over {len(cont)} teacher-forced positions (prompt {len(prompt.token_ids)} tokens)")
    print(f"{'system':<22}{'rel err mean':>14}{'rel err max':>14}{'top-1 agree':>13}")
    for name, r in (("transformers bf16", a), (f"omnistream {engine.cfg.torch_dtype}".replace('torch.', ''), b)):
        print(f"{name:<22}{r['rel_err_mean']:>14.3e}{r['rel_err_max']:>14.3e}{r['top1_agree']:>13.3f}")
    print(f"omnistream error / transformers bf16 error = {result['error_ratio']:.2f} (target <= 1.5)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result
