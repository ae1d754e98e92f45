"""Frozen perceptual networks of the decoder stage: VGG16-LPIPS and the representation encoder's own features.

Both compare a reconstruction with its target image (both in [0, 1]) and return one distance per sample;
gradients reach the reconstruction only. Weight-file layouts and the reference's constants: docs/rae.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from mfrae.checkpoint import load_state_dict_strict, load_torch_file
from mfrae.errors import CheckpointError, ConfigError
from mfrae.models.encoders import RepresentationEncoder

#################################################################################
#                       Frozen networks and weight files                        #
#################################################################################


class FrozenModule(nn.Module):
    """A module that never trains and stays in eval mode (call `_freeze()` at the end of `__init__`)."""

    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):  # noqa: D102 - frozen: always eval
        return super().train(False)


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """The flat tensor dict of a torch weights file, unwrapping a single 'model' / 'state_dict' level."""
    source = str(path)
    obj = load_torch_file(path)
    for key in ("model", "state_dict"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{source}: entries that are not tensors: {bad[:8]}")
    return dict(obj)


def require_tensor(state: dict[str, Tensor], key: str, source: str) -> Tensor:
    if key not in state:
        raise CheckpointError(f"{source}: missing key {key!r}")
    return state[key]


def unit_channels(f: Tensor, dim: int, eps: float = 1e-10) -> Tensor:
    """f / (||f|| + eps) over `dim`: LPIPS compares directions of feature vectors, not their lengths."""
    return f / (f.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)


#################################################################################
#                         Encoder feature maps                                  #
#################################################################################


class EncoderFeatureMaps(nn.Module):
    """Token maps of a frozen representation encoder for images in [0, 1]: [final tokens] + [outputs of the
    blocks in `depths`], each [B, N, C] (`RepresentationEncoder.feature_maps`). Intermediate blocks need an
    encoder that exposes them (`num_blocks` set, e.g. the Hugging Face DINOv2 encoder)."""

    def __init__(self, encoder: RepresentationEncoder, depths: Sequence[int] = ()):
        super().__init__()
        depths = tuple(int(d) for d in depths)
        num_blocks = encoder.num_blocks
        if depths and num_blocks is None:
            raise ConfigError(
                f"encoder {encoder.name!r} exposes only its final tokens; "
                f"intermediate depths {depths} are not available"
            )
        bad = [d for d in depths if not 0 <= d < (num_blocks or 0)]
        if bad:
            raise ConfigError(f"feature depths {bad} are outside the encoder's {num_blocks} blocks")
        self.encoder = encoder
        self.depths = depths

    @property
    def num_maps(self) -> int:
        return 1 + len(self.depths)

    def forward(self, images: Tensor) -> list[Tensor]:
        return self.encoder.feature_maps(images, self.depths)


class EncoderPerceptual(nn.Module):
    """P(x^, x) = mean over token maps m of mean_tokens ||u(f_m(x^)) - u(f_m(x))||^2, u = unit norm over channels:
    a cosine distance between the frozen encoder's features (mfrae's default perceptual term, docs/rae.md)."""

    def __init__(self, maps: EncoderFeatureMaps):
        super().__init__()
        self.maps = maps

    def forward(self, recon: Tensor, target: Tensor) -> Tensor:
        """recon, target [B, 3, H, W] in [0, 1] -> distances [B] (no gradient to the target)."""
        with torch.no_grad():
            target_maps = self.maps(target)
        dists = [
            (unit_channels(a, -1) - unit_channels(b, -1)).pow(2).sum(-1).mean(-1)
            for a, b in zip(self.maps(recon), target_maps)
        ]
        return torch.stack(dists).mean(0)


#################################################################################
#                                VGG16-LPIPS                                    #
#################################################################################

# torchvision `vgg16().features`: conv widths, "M" = 2x2 max-pool; every conv is followed by a ReLU.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
_LPIPS_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in `features`
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
VGG16_FILE = "vgg16-397923af.pth"
LPIPS_LIN_FILE = "vgg.pth"


class VGG16Features(FrozenModule):
    """The convolutional part of VGG16 (arXiv 1409.1556) with torchvision's `features.N` indices, up to relu5_3;
    returns the five LPIPS taps."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in _VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers)
        self._freeze()

    def forward(self, x: Tensor) -> list[Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _LPIPS_TAPS:
                taps.append(x)
        return taps


class _LinearHead(nn.Module):
    """LPIPS 1x1 channel weighting, kept as `model.1` (index 0 is the dropout of the reference layout)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class _LPIPSLinears(nn.Module):
    def __init__(self):
        super().__init__()
        for k, channels in enumerate(_LPIPS_CHANNELS):
            self.add_module(f"lin{k}", _LinearHead(channels))


class LPIPS(FrozenModule):
    """VGG16-LPIPS distance (Zhang et al., arXiv 1801.03924), per sample, for images a, b in [0, 1]:

        LPIPS(a, b) = sum_l mean_hw  w_l . (f^_l(a) - f^_l(b))^2
        f^_l = VGG16 relu-l features of (u - shift) / scale, unit-normalised over channels, u = 2 x - 1

    Weights come from two local files (`from_files`, `from_spec`; their layout is in docs/rae.md).
    """

    def __init__(self):
        super().__init__()
        self.net = VGG16Features()
        self.lins = _LPIPSLinears()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self._freeze()

    @classmethod
    def from_files(cls, vgg_path: str | Path, lin_path: str | Path) -> "LPIPS":
        """torchvision's VGG16 file (`classifier.*` ignored) and the LPIPS v0.1 linear heads, both strictly."""
        model = cls()
        vgg_state = {k: v for k, v in read_weights(vgg_path).items() if not k.startswith("classifier.")}
        load_state_dict_strict(model.net, vgg_state, str(vgg_path))
        load_state_dict_strict(model.lins, read_weights(lin_path), str(lin_path))
        return model

    @classmethod
    def from_spec(cls, spec: str | Path | Sequence[str | Path]) -> "LPIPS":
        """`spec`: a folder holding `vgg16-397923af.pth` and `vgg.pth`, or the two files as "VGG,LIN" or a pair."""
        if isinstance(spec, (str, Path)) and Path(spec).is_dir():
            folder = Path(spec)
            vgg = folder / VGG16_FILE
            if not vgg.is_file():
                candidates = sorted(folder.glob("vgg16*.pth"))
                if not candidates:
                    raise FileNotFoundError(f"{folder}: no VGG16 weights file (expected {VGG16_FILE})")
                vgg = candidates[0]
            lin = folder / LPIPS_LIN_FILE
            if not lin.is_file():
                raise FileNotFoundError(f"{folder}: no LPIPS linear-head file (expected {LPIPS_LIN_FILE})")
            return cls.from_files(vgg, lin)
        parts = [p.strip() for p in str(spec).split(",")] if isinstance(spec, (str, Path)) else [str(p) for p in spec]
        if len(parts) != 2:
            raise ConfigError(
                f"lpips_weights must be a folder with {VGG16_FILE} and {LPIPS_LIN_FILE}, "
                f"or 'VGG_FILE,LIN_FILE'; got {spec!r}"
            )
        return cls.from_files(*parts)

    def _features(self, x: Tensor) -> list[Tensor]:
        return [unit_channels(f, 1) for f in self.net(((2 * x - 1) - self.shift) / self.scale)]

    def forward(self, recon: Tensor, target: Tensor) -> Tensor:
        """recon, target [B, 3, H, W] in [0, 1] -> distances [B] (no gradient to the target)."""
        with torch.no_grad():
            target_features = self._features(target)
        total = recon.new_zeros(recon.shape[0])
        for k, (fa, fb) in enumerate(zip(self._features(recon), target_features)):
            total = total + getattr(self.lins, f"lin{k}")((fa - fb).pow(2)).mean(dim=(1, 2, 3))
        return total
