"""Image grids: float images in [0, 1] -> one PNG (Pillow only)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from mfrae.eval.samples import to_uint8_nhwc


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
