"""Qwen2.5-Omni's thinker on our own runtime: the Qwen2.5-VL decoder and vision tower
(models/qwen2_5_vl.py, reused as they are) + the audio encoder (models/qwen2_5_omni_audio.py),
with TMRoPE positions (models/tmrope.py). Text answers only: the talker and token2wav of the
full checkpoint are not loaded.

Checkpoint names: the thinker's tensors (under ``thinker.`` in the full layout) are those of
Qwen2.5-VL except the vision attention, stored as separate q / k / v (packed here into the tower's
qkv), and ``audio_tower.*``.
"""

from __future__ import annotations

import math
from typing import Generator, Sequence

import torch
from torch import nn

from omnistream.media.audio import AudioConfig
from omnistream.media.item import MediaItem
from omnistream.models.interface import MemoryEstimate
from omnistream.models.qwen2_5_omni_audio import AudioEncoder, audio_activation_bytes
from omnistream.models.qwen2_5_omni_config import OmniConfig
from omnistream.models.qwen2_5_vl import Qwen2_5_VLModel
from omnistream.models.tmrope import interleave_audio_in_video, item_positions, tmrope_positions

_SKIPPED_PARTS = ("talker.", "token2wav.")


def _pack_rows(linear: nn.Linear, parts: int) -> None:
    """Lets the checkpoint's separate q / k / v load into equal row slices of one Linear."""
    def load(param: nn.Parameter, loaded: torch.Tensor, shard: int | None = None) -> None:
        assert shard is not None, "packed parameter needs a shard index"
        rows = param.shape[0] // parts
        target = param.data.narrow(0, shard * rows, rows)
        if target.shape != loaded.shape:
            raise ValueError(f"shard {shard}: expected {tuple(target.shape)}, got {tuple(loaded.shape)}")
        target.copy_(loaded)

    linear.weight.weight_loader = load
    if linear.bias is not None:
        linear.bias.weight_loader = load


class Qwen2_5OmniThinker(Qwen2_5_VLModel):
    """`model` (decoder), `visual` (vision tower), `audio_tower`, `lm_head`. Implements
    models/interface.MultimodalLM, with audio."""

    packed_modules_mapping = {**Qwen2_5_VLModel.packed_modules_mapping, "q": ("qkv", 0), "k": ("qkv", 1), "v": ("qkv", 2)}

    def __init__(self, cfg: OmniConfig) -> None:
        super().__init__(cfg)
        self.audio_tower = AudioEncoder(cfg.audio)
        for block in self.visual.blocks:
            _pack_rows(block.attn.qkv, 3)
        self.position_id_per_seconds = cfg.position_id_per_seconds
        self.seconds_per_chunk = cfg.seconds_per_chunk
        # the features the audio tower expects (media/audio.py computes them)
        self.audio_config = AudioConfig(num_mel_bins=cfg.audio.num_mel_bins, chunk_frames=cfg.audio.chunk_frames)

    def checkpoint_name(self, name: str) -> str | None:
        """A checkpoint tensor's name in this module, or None for the parts not loaded."""
        prefix = self.cfg.weight_prefix
        if name.startswith(_SKIPPED_PARTS):
            return None
        if prefix and not name.startswith(prefix):
            return name  # unexpected: the loader reports it
        return name[len(prefix):]

    # ---------------------------------------------------------------- interface
    def positions(self, num_tokens: int, media, start: int = 0) -> tuple[torch.Tensor, int]:
        """TMRoPE (3, num_tokens) by the original Qwen2.5-Omni rule (models/tmrope.py)."""
        return tmrope_positions(num_tokens, media, self.position_id_per_seconds, start)

    def media_positions(self, item: MediaItem, start: int) -> torch.Tensor:
        return item_positions(item, start, self.position_id_per_seconds)

    def media_encoder(self, kind: str) -> nn.Module | None:
        return self.audio_tower if kind == "audio" else super().media_encoder(kind)

    def encode_media(self, rows: torch.Tensor, grids: list[tuple[int, int, int]], kind: str = "video") -> torch.Tensor:
        """Prepared rows of several items of one encoder (vision patches, or audio mel frames)
        -> (their tokens, hidden)."""
        if kind == "audio":
            return self.audio_tower(rows, grids)
        return self.visual(rows, grids)

    def encode_media_steps(self, rows: torch.Tensor, grids: list[tuple[int, int, int]], kind: str = "video") -> Generator[None, None, torch.Tensor]:
        """Vision one block per yield; the audio tower (short mel windows) whole."""
        if kind == "audio":
            return self.audio_tower(rows, grids)
        steps = self.visual.forward_steps(rows, grids)
        del rows  # the tower's generator drops them after its patch embedding
        return (yield from steps)

    def memory_estimate(self, itemsize: int, max_batched_tokens: int, max_encoder_rows: int) -> MemoryEstimate:
        """The VL estimate with the audio tower's weights (the talker and token2wav are not
        loaded) and an audio-encoder forward of as many mel frames as the encoder budget."""
        from omnistream.models.omni_demo import omni_weight_specs

        vl = super().memory_estimate(itemsize, max_batched_tokens, max_encoder_rows)
        weights = itemsize * sum(math.prod(shape) for _, shape, _ in omni_weight_specs(self.cfg))
        return MemoryEstimate(weights, max(vl.activation_bytes, audio_activation_bytes(self.cfg.audio, max_encoder_rows, itemsize)))

    def interleave_media(self, video: MediaItem, audio: Sequence[MediaItem], block_id: str) -> list[MediaItem]:
        """A video and its audio track's items -> the pieces of one audio-in-video block."""
        return interleave_audio_in_video(video, audio, self.position_id_per_seconds, self.seconds_per_chunk, block_id)
