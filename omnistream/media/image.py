"""Load one image from anything a user may hand us into a (H, W, 3) uint8 RGB array.

Rules follow qwen-vl-utils' `fetch_image`: transparency is composited on white, every other mode
(grayscale, palette, CMYK, 16-bit) is converted to RGB. Like transformers' `load_image`, the
EXIF orientation is applied, so the model sees the picture the way a viewer shows it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from omnistream.errors import MediaError, one_line

# Larger images are refused before their pixels are decoded (a 20k x 20k RGB image is 1.2 GB).
MAX_IMAGE_SIDE = 20_000
MAX_IMAGE_PIXELS = 200_000_000

ImageSource = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor


def load_image(src: ImageSource) -> np.ndarray:
    """Any supported image source -> (H, W, 3) uint8 RGB. Bad input raises MediaError."""
    if isinstance(src, (str, os.PathLike)):
        return _load_file(Path(src))
    if isinstance(src, Image.Image):
        _check_size(src.height, src.width, name="PIL image")
        return _pil_to_rgb(src, name="PIL image")
    if isinstance(src, torch.Tensor):
        return _array_to_rgb(_tensor_to_hwc(src), name="tensor")
    if isinstance(src, np.ndarray):
        return _array_to_rgb(src, name="array")
    raise MediaError(f"unsupported image source type {type(src).__name__}")


def _load_file(path: Path) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8, checking its size from the header first."""
    if path.is_dir():  # "not found" would send the user looking for a file that is there
        raise MediaError(f"{path} is a directory, not a media file")
    if not path.is_file():
        raise MediaError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise MediaError(f"image file is empty: {path}")
    try:
        with warnings.catch_warnings():
            # Our own size limit replaces PIL's decompression-bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _check_size(image.height, image.width, name=str(path))
                image.seek(0)  # animated GIF / WebP: the first frame
                image.load()
                return _pil_to_rgb(image, name=str(path))
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:
        raise MediaError(f"image too large: {path} ({exc})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise MediaError(f"cannot read image {path}: {one_line(exc)}") from None


def _check_size(height: int, width: int, *, name: str) -> None:
    if height <= 0 or width <= 0:
        raise MediaError(f"image has zero size ({width}x{height}): {name}")
    if max(height, width) > MAX_IMAGE_SIDE or height * width > MAX_IMAGE_PIXELS:
        raise MediaError(
            f"image too large ({width}x{height}; limits {MAX_IMAGE_SIDE} px per side, "
            f"{MAX_IMAGE_PIXELS} px in all): {name}"
        )


def _pil_to_rgb(image: Image.Image, *, name: str) -> np.ndarray:
    """PIL image of any mode -> (H, W, 3) uint8, alpha composited on white."""
    try:
        image = ImageOps.exif_transpose(image)
        if (image.mode == "P" and "transparency" in image.info) or image.mode in ("LA", "PA", "La"):
            image = image.convert("RGBA")
        if image.mode == "RGBA":
            # Exactly qwen-vl-utils' to_rgb: paste on white with the alpha band as mask.
            background = Image.new("RGB", image.size, (255, 255, 255))
            background.paste(image, mask=image.split()[3])
            image = background
        elif image.mode.startswith("I") and image.mode != "I;8":  # 16/32-bit grayscale
            gray = np.asarray(image, dtype=np.float64)
            scale = 255 / 65535 if gray.max(initial=0) > 255 else 1.0  # 16-bit PNG -> 8 bit
            return np.repeat(np.clip(np.rint(gray * scale), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
        elif image.mode != "RGB":
            image = image.convert("RGB")
        return np.asarray(image, dtype=np.uint8).copy()
    except (OSError, ValueError) as exc:
        raise MediaError(f"cannot convert image {name} to RGB: {one_line(exc)}") from None


def _tensor_to_hwc(tensor: torch.Tensor) -> np.ndarray:
    """Torch image (C, H, W) or (H, W, C) or (H, W) -> numpy (H, W[, C]); CHW wins on ties
    because it is torch's convention."""
    tensor = tensor.detach().cpu()
    array = (tensor.double() if tensor.is_floating_point() else tensor).numpy()  # bf16 has no numpy
    if array.ndim == 3 and array.shape[0] in (1, 3, 4):
        array = np.transpose(array, (1, 2, 0))
    return array


def _array_to_rgb(array: np.ndarray, *, name: str) -> np.ndarray:
    """(H, W), (H, W, 1|3|4) uint8 or float in [0, 1] -> (H, W, 3) uint8."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise MediaError(f"{name} of shape {tuple(array.shape)} is not an (H, W[, 1|3|4]) image")
    _check_size(array.shape[0], array.shape[1], name=name)
    array = _to_uint8(array, name=name)
    if array.ndim == 3 and array.shape[-1] == 3:
        return np.ascontiguousarray(array)
    # (H, W) -> PIL "L", (H, W, 4) -> PIL "RGBA"; PIL then does the conversion rules above.
    return _pil_to_rgb(Image.fromarray(np.ascontiguousarray(array)), name=name)


def _to_uint8(array: np.ndarray, *, name: str) -> np.ndarray:
    """uint8 as is; bool / integer in [0, 255]; float in [0, 1] scaled by 255 and rounded."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise MediaError(f"{name} of dtype {array.dtype} has values outside [0, 255]")
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise MediaError(f"{name} contains NaN or infinite values")
        if array.size and (array.min() < -1e-3 or array.max() > 1 + 1e-3):
            raise MediaError(f"float {name} must be in [0, 1], got [{array.min():.3g}, {array.max():.3g}]")
        return np.clip(np.rint(array.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    raise MediaError(f"{name} has unsupported dtype {array.dtype}")


