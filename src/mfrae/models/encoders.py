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
#                   Hugging Face encoders (DINOv2, SigLIP2, MAE)                #
#################################################################################

DINOV2_S_REG = "facebook/dinov2-with-registers-small"
DINOV2_B_REG = "facebook/dinov2-with-registers-base"
DINOV2_L_REG = "facebook/dinov2-with-registers-large"
SIGLIP2_B16_256 = "google/siglip2-base-patch16-256"
MAE_B16 = "facebook/vit-mae-base"
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)

# The pixel normalisation of each registered Hub encoder, known without loading its weights (decoding needs it).
PIXEL_NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {}


class TransformersEncoder(RepresentationEncoder):
    """A `transformers` vision model as a frozen RAE encoder, with the token handling of the RAE code
    (arXiv 2510.11690): the final LayerNorm keeps its normalisation but loses its affine (identity scale and
    shift), and the prefix tokens (CLS, registers) are dropped.

    `path` is a Hub id (needs the network or a filled HF cache) or a local folder saved with `save_pretrained`;
    `model` passes an already built model instead (then `path` only names it, e.g. the diffusers folder it was
    read from). `image_mean` / `image_std` default to the folder's `preprocessor_config.json`, else the
    model family's values.
    """

    model_class: str  # the transformers class name
    default_path: str  # the Hub id of the encoder the released RAE decoders use
    default_input_size: int
    default_mean: tuple[float, ...] = IMAGENET_MEAN
    default_std: tuple[float, ...] = IMAGENET_STD

    def __init__(self, path: str | None = None, input_size: int | None = None, image_mean: list[float] | None = None,
                 image_std: list[float] | None = None, model: nn.Module | None = None):
        super().__init__()
        path = self.default_path if path is None else path
        input_size = self.default_input_size if input_size is None else input_size
        model = self.load(path) if model is None else model
        self.model = model
        self.path = str(path)
        cfg = model.config
        final_norm = self.final_norm_owner()
        # normalize=True in RAE: every output token is standardised over its channels, no scale/shift.
        owner, attr = final_norm
        setattr(owner, attr, nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, elementwise_affine=False))
        self.input_size = int(input_size)
        self.patch_size = int(cfg.patch_size)
        self.hidden_size = int(cfg.hidden_size)
        if self.input_size % self.patch_size:
            raise ValueError(f"encoder input size {input_size} is not a multiple of the patch size {self.patch_size}")
        mean, std = _processor_normalisation(path, self.default_mean, self.default_std)
        self._set_image_normalisation(tuple(image_mean or mean), tuple(image_std or std))
        self._freeze()

    @classmethod
    def load(cls, path: str) -> nn.Module:
        import transformers

        try:
            return getattr(transformers, cls.model_class).from_pretrained(str(path))
        except (OSError, ValueError) as err:
            raise FileNotFoundError(
                f"cannot load the {cls.__name__.removesuffix('Encoder')} encoder from {str(path)!r}: {err}. "
                f"Pass a local folder (e.g. made "
                f"with `hf download {cls.default_path} --local-dir DIR`) when the Hub is unreachable."
            ) from None

    @property
    def num_prefix_tokens(self) -> int:
        return 0

    def final_norm_owner(self) -> tuple[nn.Module, str]:
        """(module, attribute) of the final LayerNorm, whose affine the RAE strips."""
        raise NotImplementedError

    def run(self, pixels: Tensor, hidden_states: bool = False):
        """The transformers forward on normalised pixels (its ModelOutput)."""
        return self.model(pixel_values=pixels, output_hidden_states=hidden_states)

    def fingerprint(self) -> str:
        return f"{self.name}:{Path(self.path).name}:{self.input_size}"

    @property
    def num_blocks(self) -> int:
        return int(self.model.config.num_hidden_layers)

    def features(self, pixels: Tensor) -> Tensor:
        return self.run(pixels).last_hidden_state[:, self.num_prefix_tokens :]

    def feature_maps(self, images: Tensor, depths: Sequence[int] = ()) -> list[Tensor]:
        """Final tokens, then the output of each block in `depths` (before the final LayerNorm)."""
        depths = tuple(int(d) for d in depths)
        if not depths:
            return [self(images)]
        bad = [d for d in depths if not 0 <= d < self.num_blocks]
        if bad:
            raise ValueError(f"blocks {bad} are outside the encoder's {self.num_blocks} blocks")
        out = self.run(self.preprocess(images), hidden_states=True)
        skip = self.num_prefix_tokens
        # hidden_states[0] is the embedding output, hidden_states[i + 1] the output of block i.
        return [out.last_hidden_state[:, skip:]] + [out.hidden_states[d + 1][:, skip:] for d in depths]


@register_encoder("dinov2")
class DINOv2Encoder(TransformersEncoder):
    """`Dinov2WithRegistersModel` (registers: arXiv 2309.16588), the default RAE encoder; CLS and register tokens
    are dropped. 224 px input gives a 16 x 16 grid for 256 px images, 448 px a 32 x 32 grid for 512 px. The
    small / large variants are `path=DINOV2_S_REG / DINOV2_L_REG`, or the encoders `dinov2_s` / `dinov2_l`."""

    name = "dinov2"
    model_class = "Dinov2WithRegistersModel"
    default_path = DINOV2_B_REG
    default_input_size = 224

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + int(self.model.config.num_register_tokens)

    def final_norm_owner(self) -> tuple[nn.Module, str]:
        return self.model, "layernorm"


@register_encoder("dinov2_s")
def dinov2_small(path: str = DINOV2_S_REG, input_size: int = 224, image_mean: list[float] | None = None,
                 image_std: list[float] | None = None) -> DINOv2Encoder:
    return DINOv2Encoder(path, input_size, image_mean, image_std)


@register_encoder("dinov2_l")
def dinov2_large(path: str = DINOV2_L_REG, input_size: int = 224, image_mean: list[float] | None = None,
                 image_std: list[float] | None = None) -> DINOv2Encoder:
    return DINOv2Encoder(path, input_size, image_mean, image_std)


@register_encoder("siglip2")
class SigLIP2Encoder(TransformersEncoder):
    """The SigLIP2 vision tower (`SiglipVisionModel`, arXiv 2502.14786) of the released SigLIP2 RAE decoder:
    SigLIP has no CLS token, so every token is kept; position embeddings are interpolated to the input size."""

    name = "siglip2"
    model_class = "SiglipVisionModel"
    default_path = SIGLIP2_B16_256
    default_input_size = 256
    default_mean, default_std = SIGLIP_MEAN, SIGLIP_STD

    def final_norm_owner(self) -> tuple[nn.Module, str]:
        # transformers 4.x nests the tower under `vision_model`; 5.x holds its modules directly.
        tower = getattr(self.model, "vision_model", self.model)
        return tower, "post_layernorm"

    def run(self, pixels: Tensor, hidden_states: bool = False):
        return self.model(pixel_values=pixels, output_hidden_states=hidden_states, interpolate_pos_encoding=True)


@register_encoder("mae")
class MAEEncoder(TransformersEncoder):
    """The MAE encoder (`ViTMAEModel`, arXiv 2111.06377) of the released MAE RAE decoder: no masking (mask
    ratio 0, and the patch order kept by passing noise 0, 1, ..., N-1 to its random shuffle), CLS dropped."""

    name = "mae"
    model_class = "ViTMAEModel"
    default_path = MAE_B16
    default_input_size = 256

    def __init__(self, path: str | None = None, input_size: int | None = None, image_mean: list[float] | None = None,
                 image_std: list[float] | None = None, model: nn.Module | None = None):
        super().__init__(path, input_size, image_mean, image_std, model)
        self.model.config.mask_ratio = 0.0  # the embeddings share this config object and read it per call

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    def final_norm_owner(self) -> tuple[nn.Module, str]:
        return self.model, "layernorm"

    def run(self, pixels: Tensor, hidden_states: bool = False):
        n = (pixels.shape[-2] // self.patch_size) * (pixels.shape[-1] // self.patch_size)
        order = torch.arange(n, device=pixels.device, dtype=pixels.dtype).expand(pixels.shape[0], n)
        return self.model(pixel_values=pixels, noise=order, output_hidden_states=hidden_states,
                          interpolate_pos_encoding=True)


PIXEL_NORMALISATION.update({name: (IMAGENET_MEAN, IMAGENET_STD) for name in ("dinov2", "dinov2_s", "dinov2_l", "mae")})
PIXEL_NORMALISATION["siglip2"] = (SIGLIP_MEAN, SIGLIP_STD)


def _processor_normalisation(path, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std from a local folder's `preprocessor_config.json`, else `mean` / `std` (the Hub's values)."""
    config_file = Path(path) / "preprocessor_config.json"
    if config_file.is_file():
        cfg = json.loads(config_file.read_text())
        return tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    return mean, std


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
