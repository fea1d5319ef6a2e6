"""The transformers oracle: logits of a full token sequence (prompt + generated tokens) with
our M-RoPE positions passed explicitly (transformers 5.x places text after a video differently
from the original rule; see omnistream/models/mrope.py)."""

from __future__ import annotations

import torch

from omnistream.models.mrope import mrope_positions


def reference_logits(hf_model, prompt_ids: list[int], media: list, output_ids: list[int], tokens_per_second: float = 2) -> torch.Tensor:
    """media: [(offset, MediaItem)] -> logits (len(output_ids), vocab) for each generated token."""
    ids = list(prompt_ids) + list(output_ids[:-1])
    positions, nxt = mrope_positions(len(prompt_ids), media, tokens_per_second)
    extra = torch.arange(nxt, nxt + len(output_ids) - 1).expand(3, -1)
    positions = torch.cat([positions, extra], dim=1)
    kwargs = {}
    images = [m for _, m in media if m.kind == "image"]
    videos = [m for _, m in media if m.kind == "video"]
    if images:
        kwargs["pixel_values"] = torch.cat([m.pixel_values for m in images])
        kwargs["image_grid_thw"] = torch.tensor([m.grid_thw for m in images])
    if videos:
        kwargs["pixel_values_videos"] = torch.cat([m.pixel_values for m in videos])
        kwargs["video_grid_thw"] = torch.tensor([m.grid_thw for m in videos])
        kwargs["second_per_grid_ts"] = torch.tensor([m.second_per_grid_t for m in videos])
    with torch.no_grad():
        out = hf_model(input_ids=torch.tensor([ids]), position_ids=positions[:, None, :], **kwargs)
    return out.logits[0, len(prompt_ids) - 1 :].float()


def assert_close_logits(ours: list[torch.Tensor], ref: torch.Tensor, rtol: float = 1e-4) -> None:
    ours_t = torch.stack(ours)
    assert ours_t.shape == ref.shape, (ours_t.shape, ref.shape)
    rel = ((ours_t - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    assert rel < rtol, f"relative logit error {rel:.2e} >= {rtol}"
    assert torch.equal(ours_t.argmax(-1), ref.argmax(-1)), "greedy tokens differ"
