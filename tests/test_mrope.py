"""M-RoPE positions on hand-computed cases (original Qwen rule)."""

from __future__ import annotations

import torch

from omnistream.models.mrope import mrope_positions


def test_text_only(make_media_item):
    pos, nxt = mrope_positions(5, [], tokens_per_second=2)
    assert pos.tolist() == [[0, 1, 2, 3, 4]] * 3 and nxt == 5


def test_image_block(make_media_item):
    # 2 text tokens, an image of 2x3 merged tokens (grid 1x4x6), 2 text tokens
    img = make_media_item("image", (1, 4, 6))
    pos, nxt = mrope_positions(2 + 6 + 2, [(2, img)], tokens_per_second=2)
    assert pos[0].tolist() == [0, 1, 2, 2, 2, 2, 2, 2, 5, 6]
    assert pos[1].tolist() == [0, 1, 2, 2, 2, 3, 3, 3, 5, 6]
    assert pos[2].tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 5, 6]
    assert nxt == 7  # text after the block starts at max(all) + 1 = 4 + 1


def test_video_long_in_time_uses_max_plus_one(make_media_item):
    # 3 temporal patches of 1x1 merged token at 2 fps: second_per_grid_t = 1.0 -> t step 2
    vid = make_media_item("video", (3, 2, 2), second_per_grid_t=1.0)
    pos, nxt = mrope_positions(1 + 3 + 1, [(1, vid)], tokens_per_second=2)
    assert pos[0].tolist() == [0, 1, 3, 5, 6]
    assert pos[1].tolist() == [0, 1, 1, 1, 6]
    assert pos[2].tolist() == [0, 1, 1, 1, 6]
    # transformers 5.x would restart text at 1 + max(H', W') = 2; the original rule gives 6
    assert nxt == 7


def test_fractional_seconds_per_grid(make_media_item):
    # fps 3 -> second_per_grid_t = 2/3 -> t = floor(k * 2 * 2/3) = 0, 1, 2, 4
    vid = make_media_item("video", (4, 2, 2), second_per_grid_t=2 / 3)
    pos, _ = mrope_positions(4, [(0, vid)], tokens_per_second=2)
    assert pos[0].tolist() == [0, 1, 2, 4]


def test_start_offset_and_two_blocks(make_media_item):
    img = make_media_item("image", (1, 2, 2))
    vid = make_media_item("video", (2, 2, 4), second_per_grid_t=0.5)
    # [img(1 tok)] text [vid (2 x 1x2)] starting at position 10
    pos, nxt = mrope_positions(1 + 1 + 4, [(0, img), (2, vid)], tokens_per_second=2, start=10)
    assert pos[0].tolist() == [10, 11, 12, 12, 13, 13]
    assert pos[2].tolist() == [10, 11, 12, 13, 12, 13]
    assert nxt == 14
    assert pos.dtype == torch.long


def test_live_patch_times_follow_real_timestamps(make_media_item):
    # patches at 0 s, 0.8 s, 5 s (a gap: frames were dropped) -> t = 0, floor(1.6) = 1, 10
    vid = make_media_item("video", (3, 2, 2), patch_times=[100.0, 100.8, 105.0])
    pos, nxt = mrope_positions(3, [(0, vid)], tokens_per_second=2)
    assert pos[0].tolist() == [0, 1, 10]
    assert nxt == 11
    # evenly spaced times give exactly the second_per_grid_t rule
    even = make_media_item("video", (3, 2, 2), patch_times=[4.0, 5.0, 6.0])
    ref = make_media_item("video", (3, 2, 2), second_per_grid_t=1.0)
    assert torch.equal(mrope_positions(3, [(0, even)], 2)[0], mrope_positions(3, [(0, ref)], 2)[0])
