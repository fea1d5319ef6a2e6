"""Pixels -> vision-tower input: CLIP normalisation and Qwen2-VL's flat patch layout.

The layout is that of transformers' Qwen2-VL image processor: rows ordered (t, h-block, w-block,
2x2 merge window) so that the 4 patches merged into one LLM token are consecutive rows, and each
row laid out (C, T, P, P) to match the Conv3d patch embedding's weight (out, C, T, P, P).
"""

from __future__ import annotations

import numpy as np
import torch

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(
    frames: np.ndarray,
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
    std: tuple[float, float, float] = OPENAI_CLIP_STD,
) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32: (x / 255 - mean) / std.

    float32 x / 255 equals transformers' float64 x * (1/255) cast to float32 for all 256 values,
    and the subtraction / division run in float32 as in its numpy code, so results match exactly.
    """
    assert frames.ndim == 4 and frames.shape[-1] == 3 and frames.dtype == np.uint8, frames.shape
    pixels = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # (N, 3, H, W)
    pixels.div_(255.0)
    pixels.sub_(torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
    pixels.div_(torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
    return pixels


def normalize_rows(rows: torch.Tensor, mean: tuple[float, float, float] = OPENAI_CLIP_MEAN,
                   std: tuple[float, float, float] = OPENAI_CLIP_STD) -> torch.Tensor:
    """Patch rows (P, C * T * P * P) as uint8 -> float32 normalised on the rows' device; float
    rows (already normalised) are returned as they are.

    Live sessions keep rows raw (4x fewer bytes to hash and to copy to the GPU) and normalise
    on the device. Column j of a row belongs to channel j // (T * P * P) (rows are laid out
    (C, T, P, P)); the ops are normalize()'s, in its order (x / 255, - mean, / std in float32),
    so the result is bit-identical to patchify(normalize(frames))."""
    if rows.dtype != torch.uint8:
        return rows
    per_channel = rows.shape[1] // 3
    m = torch.tensor(mean, dtype=torch.float32, device=rows.device).repeat_interleave(per_channel)
    s = torch.tensor(std, dtype=torch.float32, device=rows.device).repeat_interleave(per_channel)
    return rows.float().div_(255.0).sub_(m).div_(s)


def patchify(
    pixels: torch.Tensor,
    temporal_patch_size: int = 2,
    patch_size: int = 14,
    merge_size: int = 2,
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(N, C, H, W) -> pixel_values (gt * gh * gw, C * T * P * P) and grid (gt, gh, gw).

    N is padded to a multiple of T by repeating the last frame (an image, N = 1, becomes 2
    identical frames). H and W must be multiples of patch_size * merge_size (smart_resize does it).
    """
    n, c, h, w = pixels.shape
    t, p, m = temporal_patch_size, patch_size, merge_size
    assert h % (p * m) == 0 and w % (p * m) == 0, f"{h}x{w} is not a multiple of {p * m}"
    if n % t:
        pad = pixels[-1:].expand(t - n % t, c, h, w)  # repeat the last frame
        pixels = torch.cat([pixels, pad], dim=0)
    gt, gh, gw = pixels.shape[0] // t, h // p, w // p
    # (gt, T, C, gh/m, m, P, gw/m, m, P): split time into patches, space into merge blocks.
    patches = pixels.reshape(gt, t, c, gh // m, m, p, gw // m, m, p)
    # -> (gt, gh/m, gw/m, m, m, C, T, P, P): rows (t, h-block, w-block, merge window).
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = patches.reshape(gt * gh * gw, c * t * p * p)  # the one copy
    return flat, (gt, gh, gw)
