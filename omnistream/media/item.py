"""The contract between media ingestion and the engine: one preprocessed image, video or audio
clip (or a piece of one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch


def audio_chunk_tokens(frames: int) -> int:
    """LLM tokens of an audio chunk of `frames` mel frames: the Whisper-style encoder halves the
    frames twice (a stride-2 convolution, then average pooling by 2). 200 frames (2 s) -> 50."""
    after_conv = (frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


@dataclass
class MediaItem:
    """One image or video after sampling, resizing, normalising and patchifying, or one audio
    clip's log-mel features.

    Vision: rows of `pixel_values` are ordered (t, h-block, w-block, 2x2 merge window), each row
    laid out as (channel, temporal 2, 14, 14): exactly what the checkpoint's vision tower expects.
    Audio: rows are mel frames (frames, mel bins); a "temporal patch" is one encoder chunk of
    grid_thw[1] frames (2 s; every chunk of an item has the same length, so a clip whose last
    chunk is shorter is two items), grid_thw = (chunks, frames per chunk, 1).
    """

    kind: Literal["image", "video", "audio"]
    # vision: (grid_t * grid_h * grid_w, C * T_patch * P * P): float32 normalised, or uint8 raw
    # (live sessions; normalised on the device by media/patchify.normalize_rows);
    # audio: (chunks * frames per chunk, mel bins) float32 log-mel features
    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]  # vision patches (temporal, rows, cols) before 2x2 merge; audio above
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
    # Consecutive items with the same `block_id` fill one placeholder of the chat template
    # together: an audio clip whose last chunk is shorter (two items), or Qwen2.5-Omni's audio in
    # video (video and audio pieces alternating per 2 s). `source_start` is the piece's first
    # temporal patch (video) or first token (audio) in its source, which sets its time positions.
    block_id: str | None = None
    source_start: int = 0
    # live pieces of one block on a shared timeline (a live session's frames and audio): the
    # block's zero (s) for patch_times; None: patch_times[0]
    time_origin: float | None = None

    @property
    def num_tokens(self) -> int:
        """LLM placeholder tokens this item occupies (after the 2x2 patch merger, or the audio
        encoder's downsampling)."""
        return self.grid_thw[0] * self.tokens_per_temporal_patch

    @property
    def tokens_per_temporal_patch(self) -> int:
        _, h, w = self.grid_thw
        if self.kind == "audio":
            return audio_chunk_tokens(h * w)
        return (h // self.merge_size) * (w // self.merge_size)


def media_blocks(items: list[MediaItem]) -> list[list[MediaItem]]:
    """Items grouped as they fill the prompt's placeholders: consecutive items with the same
    block_id are one block, every other item is a block of its own."""
    blocks: list[list[MediaItem]] = []
    for item in items:
        if blocks and item.block_id is not None and blocks[-1][-1].block_id == item.block_id:
            blocks[-1].append(item)
        else:
            blocks.append([item])
    return blocks
