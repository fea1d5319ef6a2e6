"""TMRoPE: Qwen2.5-Omni's time-aligned M-RoPE positions, following the original rule (the Qwen
team's `get_rope_index`, which transformers 5.17 still carries unchanged for Omni).

Positions are three rows (t, h, w); text advances all three together. A media block whose first
token sits at s gets:
  image   t = s,                                   h = s + row, w = s + col
  video   t = s + int(k * second_per_grid_t * 25)   (float32 product, truncated; 25 per second)
          a live video (patch_times set): t = s + floor((patch_times[k] - origin) * 25), origin the
          item's time_origin (the block's zero when a live session's frames and audio share it)
          or else patch_times[0]
  audio   s + i on all three rows (one position per 40 ms token)
and the text after it starts at max(the block's positions) + 1.

Audio in video (a block of consecutive items sharing `block_id`, video and audio pieces
alternating per 2 s): `<|vision_bos|>` and `<|audio_bos|>` (the two tokens before the block)
share position p; every piece is placed from s = p + 1 on the one 25-per-second timeline (a
video piece from its `source_start` patch, an audio piece from its `source_start` token), and
`<|audio_eos|><|vision_eos|>` (the two tokens after it) share max(last piece) + 1, as the original
code takes the maximum of the last chunk appended. Text resumes one after that.

transformers 5.17 computes the same positions but for a prompt whose only media is audio: there it
skips its rule and uses 0..N-1, which is what the rule gives (audio is sequential). Tests compare
with `get_rope_index` and still pass positions explicitly (its `rope_deltas` is shared state).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from omnistream.errors import UserInputError
from omnistream.media.hashing import item_hash
from omnistream.media.item import MediaItem
from omnistream.models.mrope import grid_positions


def video_time_index(start: int, count: int, second_per_grid_t: float, per_second: int) -> torch.Tensor:
    """t offsets of temporal patches [start, start + count) of a video: the reference's
    (arange * float32(second_per_grid_t) * per_second).long()."""
    spg = torch.tensor(second_per_grid_t, dtype=torch.float32)
    return (torch.arange(start, start + count) * spg * per_second).long()


def item_positions(item: MediaItem, start: int, per_second: int) -> torch.Tensor:
    """(3, item.num_tokens) positions of one item (or piece) of a block whose first token sits at
    `start`."""
    if item.kind == "audio":
        return torch.arange(start + item.source_start, start + item.source_start + item.num_tokens).expand(3, -1)
    t, h, w = item.grid_thw
    lh, lw = h // item.merge_size, w // item.merge_size
    if item.kind == "video" and item.patch_times is not None:  # live: real timestamps on the block's timeline
        origin = item.patch_times[0] if item.time_origin is None else item.time_origin
        t_idx = torch.tensor([math.floor((ts - origin) * per_second) for ts in item.patch_times], dtype=torch.long)
    elif item.kind == "video":
        t_idx = video_time_index(item.source_start, t, item.second_per_grid_t, per_second)
    else:
        t_idx = torch.zeros(t, dtype=torch.long)
    return grid_positions(t_idx, lh, lw, start)


def is_audio_in_video(block: Sequence[MediaItem]) -> bool:
    kinds = {m.kind for m in block}
    return "video" in kinds and "audio" in kinds


def media_blocks(media: Sequence[tuple[int, MediaItem]]) -> list[list[tuple[int, MediaItem]]]:
    """Consecutive (offset, item) pairs sharing a block_id form one block; every other
    item is a block of its own."""
    blocks: list[list[tuple[int, MediaItem]]] = []
    for off, item in media:
        if blocks and item.block_id is not None and blocks[-1][-1][1].block_id == item.block_id:
            blocks[-1].append((off, item))
        else:
            blocks.append([(off, item)])
    return blocks


def tmrope_positions(num_tokens: int, media: Sequence[tuple[int, MediaItem]], per_second: int,
                     start: int = 0) -> tuple[torch.Tensor, int]:
    """Positions (3, num_tokens) of a sequence whose media are (offset, item) pairs (sorted,
    non-overlapping; pieces of a block contiguous), and the position of the next token."""
    parts: list[torch.Tensor] = []
    cursor, pos = 0, start

    def text(upto: int) -> None:
        nonlocal cursor, pos
        if upto < cursor:
            raise ValueError("media placeholder ranges overlap or are unsorted")
        if upto > cursor:
            parts.append(torch.arange(pos, pos + upto - cursor).expand(3, -1))
            pos += upto - cursor
            cursor = upto

    for block in media_blocks(media):
        first, end = block[0][0], block[-1][0] + block[-1][1].num_tokens
        interleaved = is_audio_in_video([m for _, m in block])
        if interleaved:  # <|vision_bos|><|audio_bos|> share one position
            text(first - 2)
            parts.append(torch.full((3, 2), pos, dtype=torch.long))
            cursor, pos = first, pos + 1
        text(first)
        base, last = pos, None
        for off, item in block:
            if off != cursor:
                raise ValueError("the pieces of an interleaved media block must be contiguous")
            last = item_positions(item, base, per_second)
            parts.append(last)
            cursor = off + item.num_tokens
        if interleaved:  # <|audio_eos|><|vision_eos|> share one position after the last piece
            if end + 2 > num_tokens:
                raise ValueError("an audio-in-video block must be followed by its two end tokens")
            eos = int(last.max()) + 1
            parts.append(torch.full((3, 2), eos, dtype=torch.long))
            cursor, pos = end + 2, eos + 1
        else:
            pos = max(int(p.max()) for p in parts[-len(block):]) + 1
    if cursor > num_tokens:
        raise ValueError("media placeholder range runs past the sequence")
    text(num_tokens)
    positions = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
    return positions, pos


# ---------------------------------------------------------------------------------------------
# audio in video: the interleaved pieces


def chunk_bounds(values: Sequence[int], per_chunk: int) -> list[tuple[int, int]]:
    """The reference's `get_chunked_index`: [start, end) runs of a non-decreasing sequence, a new
    run starting at the first value >= (number of runs so far) * per_chunk."""
    bounds, start, chunk = [], 0, 1
    for i, v in enumerate(values):
        if v >= chunk * per_chunk:
            bounds.append((start, i))
            start, chunk = i, chunk + 1
    bounds.append((start, len(values)))
    return bounds


def interleave_audio_in_video(video: MediaItem, audio: Sequence[MediaItem], per_second: int, seconds_per_chunk: int,
                              block_id: str) -> list[MediaItem]:
    """A video and its audio track's items -> the pieces of one block, in prompt order: per
    `seconds_per_chunk`, the video's temporal patches of that span, then the audio tokens of it
    (the Qwen2.5-Omni processor's layout). Audio items must hold whole chunks of
    seconds_per_chunk * per_second tokens (the last may be shorter)."""
    per_chunk = per_second * seconds_per_chunk
    t = video.grid_thw[0]
    times = video_time_index(0, t, video.second_per_grid_t, per_second).tolist()
    if any(b - a > per_chunk for a, b in zip(times, times[1:])):
        # the reference then splits a temporal patch between two chunks, which a piece cannot hold
        raise UserInputError(f"use_audio_in_video needs at least one frame pair per {seconds_per_chunk} s "
                             f"(sample the video at >= {2 / seconds_per_chunk:g} fps)")
    video_pieces = [_video_piece(video, a, b, block_id) for a, b in chunk_bounds(times, per_chunk)]
    audio_pieces = [_audio_piece(a, k, block_id) for a in audio for k in range(a.grid_thw[0])]
    tokens = 0
    for p in audio_pieces:
        if p.num_tokens > per_chunk or (p is not audio_pieces[-1] and p.num_tokens != per_chunk):
            raise ValueError("audio items of an interleaved block must hold whole chunks")
        p.source_start, tokens = tokens, tokens + p.num_tokens
    pieces: list[MediaItem] = []
    for j in range(max(len(video_pieces), len(audio_pieces))):
        pieces += video_pieces[j : j + 1] + audio_pieces[j : j + 1]
    return pieces


def _video_piece(video: MediaItem, k0: int, k1: int, block_id: str) -> MediaItem:
    _, h, w = video.grid_thw
    hashes = video.patch_hashes[k0:k1] if video.patch_hashes else None
    return MediaItem(
        kind="video", pixel_values=video.pixel_values[k0 * h * w : k1 * h * w], grid_thw=(k1 - k0, h, w),
        second_per_grid_t=video.second_per_grid_t, timestamps=video.timestamps[2 * k0 : 2 * k1],
        merge_size=video.merge_size, patch_hashes=hashes,
        content_hash=None if hashes is None else item_hash("video", hashes, video.second_per_grid_t),
        block_id=block_id, source_start=k0,
        decode_s=video.decode_s if k0 == 0 else 0.0, preprocess_s=video.preprocess_s if k0 == 0 else 0.0,
        hash_s=video.hash_s if k0 == 0 else 0.0,
    )


def _audio_piece(audio: MediaItem, k: int, block_id: str) -> MediaItem:
    _, h, w = audio.grid_thw
    hashes = audio.patch_hashes[k : k + 1] if audio.patch_hashes else None
    return MediaItem(
        kind="audio", pixel_values=audio.pixel_values[k * h * w : (k + 1) * h * w], grid_thw=(1, h, w),
        patch_hashes=hashes, content_hash=None if hashes is None else item_hash("audio", hashes),
        block_id=block_id, decode_s=audio.decode_s if k == 0 else 0.0,
        preprocess_s=audio.preprocess_s if k == 0 else 0.0, hash_s=audio.hash_s if k == 0 else 0.0,
    )
