"""Pixels in and out: Pillow images -> uint8 RGB, float tensors <-> uint8 NHWC arrays, and image grids.

Reading (`rgb8`): Pillow's `convert("RGB")` clips 16-bit grey levels ("I;16" PNGs, 0..65535) to 255 instead of
scaling them, so mid-grey would become white; 16-bit (and 32-bit integer "I") grey is scaled here, v * 255 /
65535 rounded. 16-bit colour PNGs need nothing: Pillow already reduces them to 8 bits per channel.

Float -> uint8 (`to_uint8_nhwc`) follows the official sampling scripts: clamp to [0, 1], multiply by 255 and
*truncate* (`.to(torch.uint8)`), not round; reported FIDs were computed on images made this way.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

_WIDE_GREY_MAX = 65535  # the white level of 16-bit grey, and of the "I" images Pillow makes from 16-bit files


def rgb8(image: Image.Image, where: str = "image") -> np.ndarray:
    """uint8 [H, W, 3] RGB pixels of a Pillow image (decoding it); 16-bit grey is scaled, not clipped.

    `where` names the file in the error raised for integer pixels outside 0..65535."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        grey = np.asarray(image).astype(np.int64)
        if grey.size and (grey.min() < 0 or grey.max() > _WIDE_GREY_MAX):
            raise ValueError(f"{where}: integer pixels in [{grey.min()}, {grey.max()}] are not 16-bit grey levels "
                             f"(0..{_WIDE_GREY_MAX})")
        # round(v * 255 / 65535) in integers: exact, and 257 * k maps back to k
        scaled = ((grey * 255 + _WIDE_GREY_MAX // 2) // _WIDE_GREY_MAX).astype(np.uint8)
        return np.repeat(scaled[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """Float images [N, C, H, W] in [0, 1] -> uint8 numpy [N, H, W, C]: clamp, x * 255, truncate (no rounding).

    Truncation matches the official sampling scripts, so our samples are bit-identical to theirs."""
    if images.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"expected floating-point images in [0, 1], got dtype {images.dtype}")
    scaled = images.detach().float().clamp(0.0, 1.0) * 255.0
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8_nhwc(images: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 [N, H, W, C] -> float32 tensor [N, C, H, W] in [0, 1] (x / 255)."""
    if not isinstance(images, np.ndarray):
        raise ValueError(f"expected uint8 NHWC images, got {type(images).__name__}")
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 NHWC images, got {images.dtype} with shape {images.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return tensor.permute(0, 3, 1, 2).float().div_(255.0)


def make_grid(images: np.ndarray, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """uint8 NHWC images -> one uint8 HWC mosaic, `nrow` images per row (default: a near-square grid)."""
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[top : top + h, left : left + w] = image
    return grid


def save_image_grid(images: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save float images [N, 3, H, W] (clamped to [0, 1]) as one PNG grid."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(to_uint8_nhwc(images), nrow)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path
