"""The media block of a live answer's context: retained frames and retained audio on one timeline.

    live_block(video, audio, per_second=25, seconds_per_chunk=2)

`video`: the retained temporal patches as one video item (real timestamps in `patch_times`), or
None. `audio`: the retained audio chunks as (start seconds, 1-chunk audio item), in time order.

  * frames only: [video], as a Qwen2.5-VL live session always built it;
  * audio only: the chunks as one audio block, chunk j placed from its own time:
    source_start = floor((start_j - origin) * per_second) (one position per 40 ms token; a gap in
    the sound leaves a gap in positions), origin = the first chunk's start;
  * both: one audio-in-video block (TMRoPE's rule, models/tmrope.py): one timeline from
    origin = the earliest retained frame or sound; patch k at floor((t_k - origin) * per_second)
    (the video pieces carry `time_origin`), each audio chunk from its own start as above; per
    `seconds_per_chunk` of that timeline, the video patches that start in it, then the audio
    chunks that start in it (the Qwen2.5-Omni processor's order). Where frames and sound cover
    the same seconds this is exactly how an offline video with use_audio_in_video interleaves
    them; retained frames with no sound beside them (the Star memory's old patches) simply have
    no audio chunk in their 2 s, and sound with no frame none of video.

A pure function of its inputs: a fresh run over the same retained frames and audio builds the
same items (tests/test_omni_sessions.py checks the live answer against one).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from omnistream.media.hashing import item_hash
from omnistream.media.item import MediaItem

LIVE_BLOCK_ID = "live"  # the one block of a live context (block ids only group neighbours)
# the audio sample clock sums float seconds: a chunk 2 s after the origin must land on tick 50
_TICK_EPS = 1e-6


def audio_tick(start: float, origin: float, per_second: int) -> int:
    """Position offset of an audio chunk starting at `start` on a block timeline from `origin`."""
    return math.floor((start - origin) * per_second + _TICK_EPS)


def live_block(video: MediaItem | None, audio: Sequence[tuple[float, MediaItem]], per_second: int,
               seconds_per_chunk: int) -> list[MediaItem]:
    if not audio:
        return [video] if video is not None else []
    starts = [s for s, _ in audio]
    origin = min(starts[0], video.patch_times[0]) if video is not None else starts[0]
    block_id = LIVE_BLOCK_ID if video is not None or len(audio) > 1 else None
    pieces = [dataclasses.replace(item, block_id=block_id, source_start=audio_tick(s, origin, per_second))
              for s, item in audio]
    if video is None:
        return pieces
    per_chunk = per_second * seconds_per_chunk
    # the same float expression as TMRoPE's item_positions, so a patch's chunk is its position's
    video_chunk = [math.floor((t - origin) * per_second) // per_chunk for t in video.patch_times]
    audio_chunk = [p.source_start // per_chunk for p in pieces]
    out: list[MediaItem] = []
    k = j = 0
    for c in sorted(set(video_chunk) | set(audio_chunk)):
        k1 = k
        while k1 < len(video_chunk) and video_chunk[k1] == c:
            k1 += 1
        if k1 > k:
            out.append(_video_piece(video, k, k1, origin))
        k = k1
        while j < len(pieces) and audio_chunk[j] == c:
            out.append(pieces[j])
            j += 1
    return out


def _video_piece(video: MediaItem, k0: int, k1: int, origin: float) -> MediaItem:
    """Temporal patches [k0, k1) of the retained video, placed on the block's timeline."""
    t, h, w = video.grid_thw
    times = video.patch_times[k0:k1]
    hashes = video.patch_hashes[k0:k1]
    return MediaItem(
        kind="video", pixel_values=video.pixel_values[k0 * h * w : k1 * h * w], grid_thw=(k1 - k0, h, w),
        timestamps=video.timestamps[2 * k0 : 2 * k1], patch_times=times, patch_hashes=hashes,
        # the times enter relative to the block's origin (they set the positions)
        content_hash=item_hash("video", hashes, patch_times=[origin, *times]),
        merge_size=video.merge_size, block_id=LIVE_BLOCK_ID, time_origin=origin,
    )
