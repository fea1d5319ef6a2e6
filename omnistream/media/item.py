"""The contract between media ingestion and the engine: one preprocessed image or video."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch


@dataclass
class MediaItem:
    """One image or video after sampling, resizing, normalising and patchifying.

    Rows of `pixel_values` are ordered (t, h-block, w-block, 2x2 merge window), each row laid
    out as (channel, temporal 2, 14, 14): exactly what the checkpoint's vision tower expects.
    """

    kind: Literal["image", "video"]
    # (grid_t * grid_h * grid_w, C * T_patch * P * P): float32 normalised, or uint8 raw (live
    # sessions; normalised on the device by media/patchify.normalize_rows)
    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]  # patches: (temporal patches, rows, cols) before 2x2 merge
    second_per_grid_t: float = 1.0  # seconds per temporal patch (video); 1.0 for images
    timestamps: list[float] = field(default_factory=list)  # seconds of each sampled frame (video)
    merge_size: int = 2
    decode_s: float = 0.0  # time spent decoding the source (PyAV / PIL)
    preprocess_s: float = 0.0  # resize + normalise + patchify
    content_hash: str | None = None  # identity of the pixels + preprocessing (set at ingestion)
    # start time (s) of each temporal patch when a live stream's patches are not evenly spaced;
    # M-RoPE then places patch k at floor((patch_times[k] - patch_times[0]) * tokens_per_second)
    patch_times: list[float] | None = None
    patch_hashes: list[str] | None = None  # one per temporal patch (images: one); see media/hashing.py
    hash_s: float = 0.0  # time spent hashing (once, at ingestion)

    @property
    def num_tokens(self) -> int:
        """LLM placeholder tokens this item occupies (after the 2x2 patch merger)."""
        t, h, w = self.grid_thw
        return t * (h // self.merge_size) * (w // self.merge_size)

    @property
    def tokens_per_temporal_patch(self) -> int:
        _, h, w = self.grid_thw
        return (h // self.merge_size) * (w // self.merge_size)
