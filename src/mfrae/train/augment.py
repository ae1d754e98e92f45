"""DiffAugment (Zhao et al., arXiv 2006.10738) as used on every discriminator input of the decoder stage.

Colour (brightness, saturation, contrast) then translation, differentiable in the images, cutout off; for each op
one batch-wide on/off decision with probability `prob`, then per-sample magnitudes (the StyleGAN-T variant
used by the RAE code; docs/rae.md). All draws come from torch's global RNG, so a resumed run repeats itself.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

#################################################################################
#                                 Draws                                         #
#################################################################################


@dataclass
class DiffAugParams:
    """Per-sample draws of one DiffAugment call; an op whose field is None is skipped (its batch decision).

    brightness [B] in [-0.5, 0.5), saturation [B] in [0, 2), contrast [B] in [0.5, 1.5),
    shift [B, 2] integer (row, column) displacement of the content.
    """

    brightness: Tensor | None = None
    saturation: Tensor | None = None
    contrast: Tensor | None = None
    shift: Tensor | None = None


def sample_diffaug(
    batch: int,
    height: int,
    width: int,
    device: torch.device | str = "cpu",
    prob: float = 1.0,
    translation: float = 0.125,
) -> DiffAugParams:
    """Draw DiffAugment parameters: for each op one batch-wide on/off decision with probability `prob`
    (no draw when prob >= 1), then per-sample magnitudes. Shifts are uniform integers in
    [-round(translation H), round(translation H)] (rows) and likewise for columns."""

    def on() -> bool:
        return prob >= 1 or (prob > 0 and bool(torch.rand((), device=device) < prob))

    params = DiffAugParams()
    if on():
        params.brightness = torch.rand(batch, device=device) - 0.5
    if on():
        params.saturation = torch.rand(batch, device=device) * 2
    if on():
        params.contrast = torch.rand(batch, device=device) + 0.5
    if on():
        max_dy, max_dx = int(height * translation + 0.5), int(width * translation + 0.5)
        dy = torch.randint(-max_dy, max_dy + 1, (batch,), device=device)
        dx = torch.randint(-max_dx, max_dx + 1, (batch,), device=device)
        params.shift = torch.stack([dy, dx], dim=1)
    return params


#################################################################################
#                                  Ops                                          #
#################################################################################


def translate(x: Tensor, shift: Tensor) -> Tensor:
    """Move each image's content by shift[b] = (rows, columns) pixels, filling uncovered pixels with zeros:
    out[b, :, i, j] = x[b, :, i - dy, j - dx] (0 outside). Differentiable in x, no host sync."""
    B, C, H, W = x.shape
    rows = torch.arange(H, device=x.device)[None, :] - shift[:, :1].to(x.device)  # [B, H] source rows
    cols = torch.arange(W, device=x.device)[None, :] - shift[:, 1:].to(x.device)  # [B, W] source columns
    mask = ((rows >= 0) & (rows < H))[:, :, None] & ((cols >= 0) & (cols < W))[:, None, :]  # [B, H, W]
    batch = torch.arange(B, device=x.device)[:, None, None]
    gathered = x[batch, :, rows.clamp(0, H - 1)[:, :, None], cols.clamp(0, W - 1)[:, None, :]]  # [B, H, W, C]
    return gathered.permute(0, 3, 1, 2) * mask[:, None].to(x.dtype)


def apply_diffaug(x: Tensor, params: DiffAugParams) -> Tensor:
    """Colour then translation, with per-sample magnitudes (r = the drawn value of sample b):
    brightness x + r;  saturation (x - mean_c x) r + mean_c x;  contrast (x - mean_chw x) r + mean_chw x;
    then `translate`."""

    def per_sample(v: Tensor) -> Tensor:
        return v.to(x.dtype).view(-1, 1, 1, 1)

    if params.brightness is not None:
        x = x + per_sample(params.brightness)
    if params.saturation is not None:
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * per_sample(params.saturation) + mean
    if params.contrast is not None:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * per_sample(params.contrast) + mean
    if params.shift is not None:
        x = translate(x, params.shift)
    return x


def diff_augment(x: Tensor, prob: float = 1.0, translation: float = 0.125) -> Tensor:
    """DiffAugment of images [B, 3, H, W] with fresh draws from the global RNG, differentiable in x."""
    return apply_diffaug(x, sample_diffaug(x.shape[0], x.shape[2], x.shape[3], x.device, prob, translation))


def _identity(x: Tensor) -> Tensor:
    return x


def augmenter(enabled: bool = True, prob: float = 1.0, translation: float = 0.125) -> Callable[[Tensor], Tensor]:
    """The augmentation of discriminator inputs: `diff_augment` with these settings, or the identity."""
    return functools.partial(diff_augment, prob=prob, translation=translation) if enabled else _identity
