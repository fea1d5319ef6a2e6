"""An audio clip -> the MediaItems the engine takes: log-mel features at the true length, cut
into the encoder's 2 s chunks, hashed once per chunk (the encoder cache's keys).

A clip of F mel frames is F // 200 whole chunks (one item, grid (chunks, 200, 1)) and, when the
rest holds at least one token, a shorter last chunk (a second item, grid (1, rest, 1)); the two
share a block_id (they fill one <|AUDIO|> placeholder) and the second starts at token 50 *
chunks. The features are computed over the whole clip first (the log-mel clamp uses the clip's
maximum), then cut.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Mapping

import numpy as np
import torch

from omnistream.errors import MediaError
from omnistream.media.audio import AudioClip, AudioConfig, audio_from_array, decode_audio, log_mel_features
from omnistream.media.hashing import hash_item
from omnistream.media.item import MediaItem, audio_chunk_tokens


def audio_items(clip: AudioClip, config: AudioConfig | None = None, *, model_key: str | None = None,
                device: str = "cpu") -> list[MediaItem]:
    """One clip -> 1 or 2 items (whole chunks, then a shorter last chunk); hashed when model_key
    is given (the engine always gives one)."""
    cfg = config or AudioConfig()
    t0 = time.perf_counter()
    rows = log_mel_features(clip.samples, cfg, device).T.contiguous().cpu()  # (frames, mel bins)
    preprocess_s = time.perf_counter() - t0
    size = cfg.chunk_frames
    whole, rest = divmod(rows.shape[0], size)
    block_id = uuid.uuid4().hex
    items = []
    if whole:
        items.append(MediaItem(kind="audio", pixel_values=rows[: whole * size], grid_thw=(whole, size, 1)))
    if audio_chunk_tokens(rest) > 0:  # a last chunk of 1-2 frames yields no token: the encoder drops it
        items.append(MediaItem(kind="audio", pixel_values=rows[whole * size :], grid_thw=(1, rest, 1),
                               source_start=whole * audio_chunk_tokens(size)))
    for item in items:
        item.block_id = block_id if len(items) > 1 else None
        if model_key is not None:
            hash_item(item, model_key=model_key)
    items[0].decode_s, items[0].preprocess_s = clip.decode_s, preprocess_s
    return items


def load_audio_source(src, config: AudioConfig | None = None, *, model_key: str | None = None) -> list[MediaItem]:
    """An audio content part's source -> its items. `src`: a file path (any container with an
    audio stream), {"array": samples, "sampling_rate": hz}, or a bare array (taken as 16 kHz
    mono, as qwen-omni-utils does)."""
    cfg = config or AudioConfig()
    if isinstance(src, (str, os.PathLike)):
        clip = decode_audio(src, cfg)
    elif isinstance(src, Mapping):
        if "array" not in src or "sampling_rate" not in src:
            raise MediaError('an audio array part needs {"array": samples, "sampling_rate": hz}')
        clip = audio_from_array(src["array"], src["sampling_rate"], cfg)
    elif isinstance(src, (np.ndarray, torch.Tensor, list)):
        clip = audio_from_array(src, cfg.sampling_rate, cfg)
    else:
        raise MediaError(f"unsupported audio source {type(src).__name__} (a path, or {{'array', 'sampling_rate'}})")
    return audio_items(clip, cfg, model_key=model_key)
