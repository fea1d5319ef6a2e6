"""The transformers oracle: logits of a full token sequence (prompt + generated tokens) with
our M-RoPE positions passed explicitly (transformers 5.x places text after a video differently
from the original rule; see omnistream/models/mrope.py)."""

from __future__ import annotations

import torch

from omnistream.bench.native import native_inputs


def reference_logits(hf_model, prompt_ids: list[int], media: list, output_ids: list[int], tokens_per_second: float = 2) -> torch.Tensor:
    """media: [(offset, MediaItem)] -> logits (len(output_ids), vocab) for each generated token."""
    ids = list(prompt_ids) + list(output_ids[:-1])
    p = native_inputs(prompt_ids, media, tokens_per_second)  # explicit positions + pixel tensors
    extra = torch.arange(p.next_pos, p.next_pos + len(output_ids) - 1).expand(3, -1)
    positions = torch.cat([p.positions, extra], dim=1)
    with torch.no_grad():
        out = hf_model(input_ids=torch.tensor([ids]), position_ids=positions[:, None, :], **p.hf_inputs)
    return out.logits[0, len(prompt_ids) - 1 :].float()


def assert_close_logits(ours: list[torch.Tensor], ref: torch.Tensor, rtol: float = 1e-4) -> None:
    ours_t = torch.stack(ours)
    assert ours_t.shape == ref.shape, (ours_t.shape, ref.shape)
    rel = ((ours_t - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
    assert rel < rtol, f"relative logit error {rel:.2e} >= {rtol}"
    assert torch.equal(ours_t.argmax(-1), ref.argmax(-1)), "greedy tokens differ"
