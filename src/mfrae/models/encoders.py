"""Frozen representation encoders for the RAE, behind a small registry.

An encoder maps images in [0, 1] to raw representation tokens [B, N, C] (N = grid^2, row-major patches),
before any latent normalisation. The default is DINOv2-B with registers (RAE, arXiv 2510.11690); further
encoders register themselves with `@register_encoder(name)` and are built with `build_encoder(name, ...)`.
Encoders are frozen: their weights never train and are never written into mfrae checkpoints.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RepresentationEncoder(nn.Module):
    """Base class of frozen encoders.

    Subclasses set `input_size` (pixels seen by the network), `patch_size`, `hidden_size` and the
    `image_mean` / `image_std` buffers (the decoder predicts pixels in this normalised space), and implement
    `features(images_normalised) -> [B, N, C]`. An encoder that can show the outputs of its blocks (for
    perceptual losses and discriminators) also sets `num_blocks` and overrides `feature_maps`.
    """

    name: str = "encoder"
    input_size: int
    patch_size: int
    hidden_size: int

    def _set_image_normalisation(self, mean, std) -> None:
        self.register_buffer("image_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):  # noqa: D102 - frozen encoders stay in eval mode
        return super().train(False)

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    def fingerprint(self) -> str:
        """A short string that identifies the weights (used to key latent caches)."""
        return self.name

    @property
    def num_blocks(self) -> int | None:
        """How many blocks `feature_maps` can tap, or None when only the final tokens are exposed."""
        return None

    def features(self, pixels: Tensor) -> Tensor:
        raise NotImplementedError

    def preprocess(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [0, 1] -> the network's input: resized to `input_size`, normalised."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"encoder expects RGB images [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        if images.shape[-2:] != (self.input_size, self.input_size):
            # Plain bicubic (no antialias), as the reference pipeline does before normalisation.
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        return (images - self.image_mean) / self.image_std

    def forward(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [0, 1] -> tokens [B, N, C]."""
        return self.features(self.preprocess(images))

    def feature_maps(self, images: Tensor, depths: Sequence[int] = ()) -> list[Tensor]:
        """images in [0, 1] -> [final tokens] + [output of block d for d in `depths`], each [B, N, C] with the
        prefix (CLS, register) tokens dropped. The base class exposes the final tokens only."""
        if tuple(depths):
            raise ValueError(f"encoder {self.name!r} exposes only its final tokens, not blocks {tuple(depths)}")
        return [self(images)]


#################################################################################
#                                 Registry                                      #
#################################################################################

ENCODERS: dict[str, Callable[..., RepresentationEncoder]] = {}


def register_encoder(name: str):
    def decorator(factory: Callable[..., RepresentationEncoder]):
        ENCODERS[name] = factory
        return factory

    return decorator


def build_encoder(name: str, **options) -> RepresentationEncoder:
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; registered: {sorted(ENCODERS)}")
    return ENCODERS[name](**options)


#################################################################################
#                           DINOv2 with registers                               #
#################################################################################

DINOV2_B_REG = "facebook/dinov2-with-registers-base"


@register_encoder("dinov2")
class DINOv2Encoder(RepresentationEncoder):
    """Hugging Face `Dinov2WithRegistersModel` with the final LayerNorm stripped of its affine,
    the CLS and register tokens dropped, as the RAE encoder (arXiv 2510.11690; registers: arXiv 2309.16588).

    `path` is a Hub id (needs the network or a filled HF cache) or a local folder saved with
    `save_pretrained`. 224 px input gives a 16 x 16 grid for 256 px images, 448 px a 32 x 32 grid for 512 px.
    """

    name = "dinov2"

    def __init__(self, path: str = DINOV2_B_REG, input_size: int = 224):
        super().__init__()
        from transformers import Dinov2WithRegistersModel

        try:
            model = Dinov2WithRegistersModel.from_pretrained(str(path))
        except (OSError, ValueError) as err:
            raise FileNotFoundError(
                f"cannot load the DINOv2 encoder from {str(path)!r}: {err}. Pass a local folder "
                f"(e.g. made with `hf download {DINOV2_B_REG} --local-dir DIR`) when the Hub is unreachable."
            ) from None
        cfg = model.config
        # normalize=True in RAE: every output token is standardised over its channels, no scale/shift.
        model.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, elementwise_affine=False)
        self.model = model
        self.path = str(path)
        self.input_size = int(input_size)
        self.patch_size = int(cfg.patch_size)
        self.hidden_size = int(cfg.hidden_size)
        self.num_prefix_tokens = 1 + int(cfg.num_register_tokens)
        if self.input_size % self.patch_size:
            raise ValueError(f"encoder input size {input_size} is not a multiple of the patch size {self.patch_size}")
        mean, std = _processor_normalisation(path)
        self._set_image_normalisation(mean, std)
        self._freeze()

    def fingerprint(self) -> str:
        return f"dinov2:{Path(self.path).name}:{self.input_size}"

    @property
    def num_blocks(self) -> int:
        return int(self.model.config.num_hidden_layers)

    def features(self, pixels: Tensor) -> Tensor:
        tokens = self.model(pixel_values=pixels).last_hidden_state
        return tokens[:, self.num_prefix_tokens :]

    def feature_maps(self, images: Tensor, depths: Sequence[int] = ()) -> list[Tensor]:
        """Final tokens, then the output of each block in `depths` (before the final LayerNorm)."""
        depths = tuple(int(d) for d in depths)
        if not depths:
            return [self(images)]
        bad = [d for d in depths if not 0 <= d < self.num_blocks]
        if bad:
            raise ValueError(f"blocks {bad} are outside the encoder's {self.num_blocks} blocks")
        out = self.model(pixel_values=self.preprocess(images), output_hidden_states=True)
        skip = self.num_prefix_tokens
        # hidden_states[0] is the embedding output, hidden_states[i + 1] the output of block i.
        return [out.last_hidden_state[:, skip:]] + [out.hidden_states[d + 1][:, skip:] for d in depths]


def _processor_normalisation(path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std from a local folder's `preprocessor_config.json`, else the ImageNet values (same as the Hub's)."""
    config_file = Path(path) / "preprocessor_config.json"
    if config_file.is_file():
        cfg = json.loads(config_file.read_text())
        return tuple(cfg.get("image_mean", IMAGENET_MEAN)), tuple(cfg.get("image_std", IMAGENET_STD))
    return IMAGENET_MEAN, IMAGENET_STD


def tokens_to_grid(tokens: Tensor) -> Tensor:
    """[B, N, C] -> [B, C, g, g] (channel = token feature, (h, w) = patch grid)."""
    B, N, C = tokens.shape
    g = math.isqrt(N)
    if g * g != N:
        raise ValueError(f"{N} tokens do not form a square grid")
    return tokens.transpose(1, 2).reshape(B, C, g, g)


def grid_to_tokens(grid: Tensor) -> Tensor:
    """[B, C, g, g] -> [B, g*g, C], the inverse of `tokens_to_grid`."""
    return grid.flatten(2).transpose(1, 2)
