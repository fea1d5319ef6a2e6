"""Native (transformers) inference over exactly the engine's inputs.

`native_answer(hf, ids, media, ...)` runs transformers' Qwen2_5_VLForConditionalGeneration on a
token sequence with its media items ([(offset, MediaItem)], as `Session.prompt_for` and
`LiveSession.prompt_for` return them), passing our M-RoPE positions explicitly (transformers 5.x
places text after a video differently from the original rule; see omnistream/models/mrope.py):
one prefill with the pixels (vision tower inside it), then greedy decode. Used by
`omnistream stream --compare` and `omnistream bench stream` (the seed's approach: re-encode all
retained frames at each question).
"""

from __future__ import annotations

import torch

from omnistream.bench.latency import Prepared, hf_greedy
from omnistream.media.patchify import normalize_rows
from omnistream.models.mrope import mrope_positions


def native_inputs(ids: list[int], media: list, tokens_per_second: float = 2) -> Prepared:
    """(ids, [(offset, MediaItem)]) -> Prepared (explicit positions, pixel tensors on the host)."""
    positions, next_pos = mrope_positions(len(ids), media, tokens_per_second)
    kwargs: dict[str, torch.Tensor] = {}
    images = [m for _, m in media if m.kind == "image"]
    videos = [m for _, m in media if m.kind == "video"]
    if images:
        kwargs["pixel_values"] = torch.cat([normalize_rows(m.pixel_values) for m in images])
        kwargs["image_grid_thw"] = torch.tensor([m.grid_thw for m in images])
    if videos:
        kwargs["pixel_values_videos"] = torch.cat([normalize_rows(m.pixel_values) for m in videos])
        kwargs["video_grid_thw"] = torch.tensor([m.grid_thw for m in videos])
        kwargs["second_per_grid_ts"] = torch.tensor([m.second_per_grid_t for m in videos])
    return Prepared([], list(ids), positions, next_pos, kwargs)


def native_answer(hf, ids: list[int], media: list, new_tokens: int, tokens_per_second: float = 2) -> dict:
    """Greedy answer of transformers from scratch -> {"tokens", "ttft_s" (vision + prefill, pixels'
    host-to-device copy included), "total_s", "prompt_tokens"}."""
    return native_prepared(hf, native_inputs(ids, media, tokens_per_second), new_tokens)


def native_prepared(hf, p: Prepared, new_tokens: int) -> dict:
    """native_answer for an already prepared input (e.g. latency.prepare of a conversation)."""
    from transformers import DynamicCache

    device = next(hf.parameters()).device
    dtype = next(hf.parameters()).dtype
    p.hf_inputs = {k: (v.to(dtype) if v.is_floating_point() and k.startswith("pixel") else v) for k, v in p.hf_inputs.items()}
    r = hf_greedy(hf, p, device, max(1, new_tokens), DynamicCache(config=hf.config), first_logits=True)
    per_tok = r["decode_ms_per_token"] or 0.0
    return {"tokens": r["tokens"], "ttft_s": r["ttft_s"], "total_s": r["ttft_s"] + per_tok * (len(r["tokens"]) - 1) / 1000,
            "prompt_tokens": len(p.prompt_ids), "first_logits": r["first_logits"]}


def load_native(model_dir, device: str, dtype: torch.dtype):
    """transformers' model from a checkpoint directory (sdpa attention, eval, no grads)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    return hf.to(device).eval().requires_grad_(False)


def token_agreement(ours: list[int], theirs: list[int]) -> str:
    """'k/n' equal tokens at the same positions (n = the shorter answer), '=' suffix when identical."""
    n = min(len(ours), len(theirs))
    same = sum(a == b for a, b in zip(ours, theirs))
    return f"{same}/{n}" + (" (identical)" if list(ours) == list(theirs) else "")
