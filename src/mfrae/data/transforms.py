"""Image preprocessing: the ADM center crop, conversions between Pillow, numpy and torch, and a seeded random
affine augmentation for in-memory image batches."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """The ADM center crop (Dhariwal & Nichol 2021), returned as a uint8 array [image_size, image_size, C].

    1. While the short side is at least 2 * image_size, halve both sides (integer division) with a BOX
       filter: cheap, alias-free downscaling of very large photos.
    2. Resize with BICUBIC so that the short side is exactly image_size (long side rounded).
    3. Cut the central image_size x image_size window; when the margin is odd the extra pixel is on the
       bottom/right.
    """
    if int(image_size) != image_size or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    image = pil_image
    while min(image.size) >= 2 * image_size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)

    scale = image_size / min(image.size)
    # The short side maps to image_size exactly; round() absorbs float error in short * (size / short).
    new_size = (round(image.width * scale), round(image.height * scale))
    image = image.resize(new_size, resample=Image.Resampling.BICUBIC)

    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def uint8_to_tensor(arr: np.ndarray) -> Tensor:
    """uint8 [H, W, C] (or [H, W]) array -> float32 tensor [C, H, W] in [0, 1]."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float().div_(255.0)


def random_affine(images: Tensor, max_shift: float, scale_jitter: float, generator: torch.Generator) -> Tensor:
    """Mild geometric augmentation of a batch [B, C, H, W]: each image is shifted by up to `max_shift` pixels
    along each axis and zoomed by a factor in [1 - scale_jitter, 1 + scale_jitter] (bilinear resampling;
    uncovered pixels are 0, the digits' black background). Draws from `generator` so runs are reproducible."""
    b, _, h, w = images.shape
    if max_shift <= 0 and scale_jitter <= 0:
        return images
    rand = torch.rand(b, 3, generator=generator) * 2 - 1  # uniform in [-1, 1]
    # affine_grid maps output coordinates in [-1, 1] to input coordinates: x_in = x_out / zoom - shift.
    zoom = 1.0 + scale_jitter * rand[:, 0]
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = 1.0 / zoom
    theta[:, 1, 1] = 1.0 / zoom
    theta[:, 0, 2] = -rand[:, 1] * max_shift * 2.0 / w  # one pixel is 2 / w in grid units
    theta[:, 1, 2] = -rand[:, 2] * max_shift * 2.0 / h
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
