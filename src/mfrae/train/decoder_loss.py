"""Stage-1 objective: training the RAE pixel decoder (RAE spec section 5).

Generator (decoder) loss, per sample b, for images x in [0, 1]:

    z      = E(x)                                  frozen encoder tokens [B, N, C]
    z~     = z + sigma_b * n,  n ~ N(0, I)          sigma_b = tau * U[0, 1)  ("uniform", official code)
                                                   sigma_b = |N(0, tau^2)|  ("halfnormal", the paper)
    x^     = D(z~) * image_std + image_mean        reconstruction in [0, 1] (not clamped)
    L_rec  = w_1 * mean|x^ - x|  +  w_P * P(x^, x)
    L_G    = -mean D_disc(DiffAug(2 x^ - 1))       (only once step >= gan_start_step)
    L      = L_rec + w_G * lambda * L_G
    lambda = clamp(||grad_W mean L_rec|| / (||grad_W mean L_G|| + 1e-6), 0, max_adaptive_weight), detached,
             W = decoder_pred.weight (the decoder's last layer)

Discriminator update (`discriminator_step`, once step >= disc_start_step), hinge loss
    L_D = 0.5 * (mean relu(1 - D_disc(DiffAug(real))) + mean relu(1 + D_disc(DiffAug(fake))))
with real = 2x - 1 and fake = q(clamp(2 D(E(x)) - 1, -1, 1)), a fresh no-grad reconstruction from *un-noised*
tokens quantised to 8 bits by q(u) = round((u + 1) * 127.5) / 127.5 - 1.

Perceptual term P:
    "encoder"  (default) mean over frozen-encoder feature maps of the mean over tokens of ||f^ - f||^2, where f
               is a token unit-normalised over its channels (a cosine distance; gradients reach x^ through the
               frozen encoder).
    "lpips"    VGG16-LPIPS in plain torch from local weight files (`LPIPS.from_files`).
Discriminator D_disc: one trainable head per frozen feature map (`TokenHead`, the DINO-disc head design), on
    "encoder"  (default) the frozen representation encoder (final tokens, plus intermediate blocks when the
               encoder exposes them, i.e. the Hugging Face DINOv2 encoder),
    "dino"     a frozen DINO ViT-S/8 from a local file (`DinoViT.from_file`), blocks 2, 5, 8, 11 and the final
               output first (spec 5.3).

All randomness (noise, DiffAugment) comes from torch's global RNG so a resumed run repeats itself exactly.
`state_dict()` holds only the trainable discriminator heads and their optimizer; the frozen encoder, VGG and
DINO weights are never written.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from mfrae.checkpoint import load_state_dict_strict, load_torch_file
from mfrae.errors import CheckpointError, ConfigError
from mfrae.layers import Attention, PatchEmbed
from mfrae.models.encoders import IMAGENET_MEAN, IMAGENET_STD, DINOv2Encoder, RepresentationEncoder
from mfrae.models.rae import NOISE_DISTRIBUTIONS, noise_tokens

PERCEPTUAL_KINDS = ("encoder", "lpips", "none")
DISCRIMINATOR_KINDS = ("encoder", "dino", "none")
DINO_KEY_DEPTHS = (2, 5, 8, 11)  # blocks whose outputs feed the DINO discriminator heads (spec 5.3)

#################################################################################
#                              Small pieces                                     #
#################################################################################


def quantize_8bit(x: Tensor) -> Tensor:
    """Clamp images in [-1, 1] and snap them to the 256 levels of an 8-bit image: round((x + 1) 127.5) / 127.5 - 1."""
    return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake)))."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def adaptive_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """lambda = ||grad_W rec_loss|| / (||grad_W gan_loss|| + 1e-6), clamped to [0, max_weight] and detached.

    Uses `torch.autograd.grad` (graph retained), so it accumulates nothing into `.grad` and does not fire the
    gradient hooks of DistributedDataParallel.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-6)
    return weight.clamp(0.0, max_weight).detach()


def _unwrap(net: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or similar) wrapper."""
    return net.module if hasattr(net, "module") and isinstance(net.module, nn.Module) else net


def _check_images(x: Tensor, where: str) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{where} expects RGB images [B, 3, H, W] in [0, 1], got shape {tuple(x.shape)}")


class _FrozenModule(nn.Module):
    """A module that never trains and stays in eval mode."""

    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):  # noqa: D102 - frozen: always eval
        return super().train(False)


#################################################################################
#                                DiffAugment                                    #
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
    """Draw DiffAugment parameters (spec 5.4): for each op one batch-wide on/off decision with probability `prob`
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
    """DiffAugment with prob 1 and no cutout (spec 5.4): fresh draws from the global RNG, differentiable."""
    return apply_diffaug(x, sample_diffaug(x.shape[0], x.shape[2], x.shape[3], x.device, prob, translation))


#################################################################################
#                      Frozen feature extractors                                #
#################################################################################


def default_key_depths(num_layers: int) -> tuple[int, ...]:
    """Blocks at the ends of the four quarters of the network: (2, 5, 8, 11) for 12 blocks."""
    return tuple(sorted({max(0, (k + 1) * num_layers // 4 - 1) for k in range(4)}))


def encoder_depth(encoder: RepresentationEncoder) -> int | None:
    """Number of blocks whose outputs `EncoderFeatureMaps` can tap, or None when only the final tokens are exposed."""
    if isinstance(encoder, DINOv2Encoder):
        return int(encoder.model.config.num_hidden_layers)
    return None


class EncoderFeatureMaps(nn.Module):
    """Token maps of the frozen representation encoder for images in [0, 1]: [final tokens] + [block outputs
    after `depths`] (prefix tokens dropped), each [B, N, C]. Intermediate blocks need an encoder that exposes
    them (the Hugging Face DINOv2 encoder); other encoders give the final tokens only."""

    def __init__(self, encoder: RepresentationEncoder, depths: Sequence[int] = ()):
        super().__init__()
        depths = tuple(int(d) for d in depths)
        num_layers = encoder_depth(encoder)
        if depths and num_layers is None:
            raise ConfigError(
                f"encoder {encoder.name!r} exposes only its final tokens; "
                f"intermediate depths {depths} are not available"
            )
        bad = [d for d in depths if not 0 <= d < (num_layers or 0)]
        if bad:
            raise ConfigError(f"feature depths {bad} are outside the encoder's {num_layers} blocks")
        self.encoder = encoder
        self.depths = depths

    @property
    def num_maps(self) -> int:
        return 1 + len(self.depths)

    def forward(self, images: Tensor) -> list[Tensor]:
        enc = self.encoder
        if not self.depths:
            return [enc(images)]
        # The same resize + normalisation as RepresentationEncoder.forward, then the HF model with its hidden
        # states (hidden_states[i + 1] is the output of block i, before the final LayerNorm).
        _check_images(images, "encoder features")
        if images.shape[-2:] != (enc.input_size, enc.input_size):
            images = F.interpolate(images, size=(enc.input_size, enc.input_size), mode="bicubic", align_corners=False)
        pixels = (images - enc.image_mean) / enc.image_std
        out = enc.model(pixel_values=pixels, output_hidden_states=True)
        skip = enc.num_prefix_tokens
        return [out.last_hidden_state[:, skip:]] + [out.hidden_states[d + 1][:, skip:] for d in self.depths]


class _EncoderDiscFeatures(nn.Module):
    """Discriminator input in [-1, 1] -> the encoder's [0, 1] input -> token maps."""

    def __init__(self, maps: EncoderFeatureMaps):
        super().__init__()
        self.maps = maps

    @property
    def num_maps(self) -> int:
        return self.maps.num_maps

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.maps((x + 1) / 2)


class _DinoMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class _DinoBlock(nn.Module):
    """Pre-LN ViT block (timm names): x + Attn(norm1 x), then x + MLP(norm2 x)."""

    def __init__(self, dim: int, num_heads: int, hidden: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = _DinoMlp(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DinoViT(_FrozenModule):
    """Frozen DINO (v1) ViT, ViT-S/8 by default (spec 5.3), with timm key names: `patch_embed.proj`, `cls_token`,
    `pos_embed`, `blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm`.

    `forward(x, depths)` takes images in [-1, 1], resizes them bilinearly to `img_size`, applies the ImageNet
    normalisation ((x + 1) / 2 - mean) / std, and returns the patch-token maps [B, N, D] (CLS removed) of the final
    block first, then after each block in `depths`. The final `norm` is loaded but, as in the reference, not applied.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 8, dim: int = 384, depth: int = 12, num_heads: int = 6,
                 mlp_hidden: int | None = None, eps: float = 1e-6):
        super().__init__()
        self.img_size, self.patch_size, self.dim, self.depth = img_size, patch_size, dim, depth
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, dim))
        self.blocks = nn.ModuleList([_DinoBlock(dim, num_heads, mlp_hidden or 4 * dim, eps) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._freeze()

    @classmethod
    def from_file(cls, path: str | Path, num_heads: int | None = None) -> "DinoViT":
        """Load a timm-layout DINO ViT state dict (e.g. `dino_vit_small_patch8_224.pth`), strictly.

        The architecture is read from the tensor shapes (width, patch, grid, depth, MLP width); the head count
        defaults to width / 64 (6 for ViT-S). `head.*` classifier keys are ignored. The key part of every qkv bias
        is zeroed on load (softmax is invariant to it), as in the reference.
        """
        source = str(path)
        state = _tensor_dict(load_torch_file(path), source)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        proj = _require(state, "patch_embed.proj.weight", source)
        pos = _require(state, "pos_embed", source)
        fc1 = _require(state, "blocks.0.mlp.fc1.weight", source)
        dim, patch = int(proj.shape[0]), int(proj.shape[-1])
        grid = math.isqrt(int(pos.shape[1]) - 1)
        if grid * grid != pos.shape[1] - 1:
            raise CheckpointError(f"{source}: pos_embed {tuple(pos.shape)} is not 1 + a square number of tokens")
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        if num_heads is None:
            if dim % 64:
                raise CheckpointError(f"{source}: width {dim} is not a multiple of 64; pass num_heads explicitly")
            num_heads = dim // 64
        model = cls(grid * patch, patch, dim, depth, num_heads, mlp_hidden=int(fc1.shape[0]))
        load_state_dict_strict(model, state, source)
        with torch.no_grad():
            for block in model.blocks:
                block.attn.qkv.bias[dim : 2 * dim].zero_()
        return model

    def forward(self, x: Tensor, depths: Sequence[int] = DINO_KEY_DEPTHS) -> list[Tensor]:
        if x.shape[-2:] != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        x = ((x + 1) / 2 - self.image_mean) / self.image_std
        h = self.patch_embed(x)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1) + self.pos_embed
        taps: dict[int, Tensor] = {}
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i in depths:
                taps[i] = h[:, 1:]
        return [h[:, 1:]] + [taps[d] for d in depths]


class _DinoDiscFeatures(nn.Module):
    def __init__(self, vit: DinoViT, depths: Sequence[int]):
        super().__init__()
        bad = [d for d in depths if not 0 <= d < vit.depth]
        if bad:
            raise ConfigError(f"discriminator depths {bad} are outside the DINO ViT's {vit.depth} blocks")
        self.vit = vit
        self.depths = tuple(depths)

    @property
    def num_maps(self) -> int:
        return 1 + len(self.depths)

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.vit(x, self.depths)


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


class VGG16Features(_FrozenModule):
    """The convolutional part of VGG16 with torchvision's `features.N` indices (up to relu5_3)."""

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


def _unit_channels(f: Tensor, dim: int, eps: float = 1e-10) -> Tensor:
    return f / (f.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)


class LPIPS(_FrozenModule):
    """VGG16-LPIPS distance, per sample:

        LPIPS(a, b) = sum_l mean_hw  w_l . (f^_l(a) - f^_l(b))^2
        f^_l = VGG16 relu-l features of (u - shift) / scale, unit-normalised over channels, u = 2 x - 1

    for images a, b in [0, 1]. Weights come from two local files (`from_files`):

        vgg16-397923af.pth   torchvision ImageNet VGG16; uses `features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.weight`
                             / `.bias` (conv kernels [C_out, C_in, 3, 3]); `classifier.*` keys are ignored.
        vgg.pth              LPIPS v0.1 linear heads: `lin{0..4}.model.1.weight`, shapes [1, C, 1, 1] with
                             C = 64, 128, 256, 512, 512; no other keys.
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
        model = cls()
        vgg_state = _tensor_dict(load_torch_file(vgg_path), str(vgg_path))
        vgg_state = {k: v for k, v in vgg_state.items() if not k.startswith("classifier.")}
        load_state_dict_strict(model.net, vgg_state, str(vgg_path))
        load_state_dict_strict(model.lins, _tensor_dict(load_torch_file(lin_path), str(lin_path)), str(lin_path))
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
        return [_unit_channels(f, 1) for f in self.net(((2 * x - 1) - self.shift) / self.scale)]

    def forward(self, recon: Tensor, target: Tensor) -> Tensor:
        """recon, target [B, 3, H, W] in [0, 1] -> distances [B] (no gradient to the target)."""
        with torch.no_grad():
            target_features = self._features(target)
        total = recon.new_zeros(recon.shape[0])
        for k, (fa, fb) in enumerate(zip(self._features(recon), target_features)):
            total = total + getattr(self.lins, f"lin{k}")((fa - fb).pow(2)).mean(dim=(1, 2, 3))
        return total


class EncoderPerceptual(nn.Module):
    """P(x^, x) = mean over token maps m of mean_tokens ||u(f_m(x^)) - u(f_m(x))||^2, u = unit norm over channels.

    The maps are the encoder's final tokens plus the intermediate blocks in `depths` (see `EncoderFeatureMaps`).
    """

    def __init__(self, maps: EncoderFeatureMaps):
        super().__init__()
        self.maps = maps

    def forward(self, recon: Tensor, target: Tensor) -> Tensor:
        with torch.no_grad():
            target_maps = self.maps(target)
        dists = [
            (_unit_channels(a, -1) - _unit_channels(b, -1)).pow(2).sum(-1).mean(-1)
            for a, b in zip(self.maps(recon), target_maps)
        ]
        return torch.stack(dists).mean(0)


#################################################################################
#                             Discriminator                                     #
#################################################################################


class BatchNormLocal(nn.Module):
    """Normalisation over the tokens of each sample, per channel (BatchNorm with a virtual batch of 1):
    y = (x - mean_L x) / sqrt(var_L x + eps) * weight + bias for x [B, C, L]."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight[:, None] + self.bias[:, None]


class _CircularConv1d(nn.Conv1d):
    """Conv1d with circular padding done by indexing, so any number of tokens works (even fewer than the kernel)."""

    def forward(self, x: Tensor) -> Tensor:
        pad = self.kernel_size[0] // 2
        index = torch.arange(-pad, x.shape[-1] + pad, device=x.device) % x.shape[-1]
        return super().forward(x[..., index])


class TokenHead(nn.Module):
    """Discriminator head on one token map [B, C, L] -> logits [B, L] (spec 5.3):

        h = LReLU(BNL(SN-Conv1d_k1(x)));  h = (LReLU(BNL(SN-Conv1d_k(h), circular)) + h) / sqrt 2;  SN-Conv1d_k1(h) -> 1
    """

    def __init__(self, channels: int, kernel_size: int = 9):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ConfigError(f"disc_kernel_size must be odd, got {kernel_size}")
        self.proj = nn.Sequential(
            spectral_norm(nn.Conv1d(channels, channels, 1)), BatchNormLocal(channels), nn.LeakyReLU(0.2)
        )
        self.residual = nn.Sequential(
            spectral_norm(_CircularConv1d(channels, channels, kernel_size)), BatchNormLocal(channels), nn.LeakyReLU(0.2)
        )
        self.out = spectral_norm(nn.Conv1d(channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x)
        h = (self.residual(h) + h) / math.sqrt(2)
        return self.out(h).squeeze(1)


class TokenDiscriminator(nn.Module):
    """Trainable heads on frozen token maps: images in [-1, 1] -> logits [B, sum of tokens over maps]."""

    def __init__(self, features: nn.Module, channels: int, kernel_size: int = 9):
        super().__init__()
        self.features = features
        self.heads = nn.ModuleList([TokenHead(channels, kernel_size) for _ in range(features.num_maps)])

    def forward(self, x: Tensor) -> Tensor:
        maps = self.features(x)
        return torch.cat([head(m.transpose(1, 2)) for head, m in zip(self.heads, maps)], dim=1)


#################################################################################
#                                The loss                                       #
#################################################################################


class DecoderLoss(nn.Module):
    """Stage-1 decoder objective (see the module docstring for the formulas).

    Args:
        encoder: the frozen representation encoder whose tokens the decoder inverts.
        noise_tau, noise_dist: noise augmentation of the tokens in the generator loss (spec 5.1).
        l1_weight, perceptual_weight, gan_weight: w_1, w_P, w_G.
        perceptual: "encoder" (frozen-encoder features), "lpips" (needs `lpips_weights`, see `LPIPS.from_spec`),
            or "none".
        discriminator: "encoder" (heads on the frozen encoder), "dino" (needs `dino_weights`, a timm-layout
            `dino_vit_small_patch8_224.pth`), or "none" (no GAN at all).
        gan_start_step: first step whose generator loss has the GAN term (default = epoch 8 of ImageNet at
            global batch 512, 2502 steps per epoch).
        disc_start_step: first step at which `discriminator_step` updates the discriminator (epoch 6 likewise).
        max_adaptive_weight: upper clamp of lambda.
        disc_lr, disc_betas, disc_weight_decay: AdamW of the discriminator heads (eps 1e-8).
        disc_lr_schedule: optional step -> factor applied to `disc_lr` at each discriminator step (e.g. the
            decoder's cosine schedule).
        diffaug, diffaug_prob, diffaug_translation: DiffAugment on every discriminator input.
        disc_layers: intermediate blocks feeding extra heads; default (2, 5, 8, 11) for "dino" and the quarter
            blocks of the encoder for "encoder" when it exposes them (else the final tokens only).
        disc_kernel_size: kernel of the circular residual convolution of each head.
        perceptual_layers: intermediate encoder blocks for the "encoder" perceptual term; default the quarter
            blocks except the last (whose normalised output is already the final tokens).

    `self.last_stats` holds detached scalar tensors of the last generator call (l1, perceptual, gan, adaptive_weight).
    Under `torch.no_grad()` the adaptive weight cannot be measured, so the GAN term is left out there.
    """

    def __init__(
        self,
        encoder: RepresentationEncoder,
        *,
        noise_tau: float = 0.8,
        noise_dist: Literal["uniform", "halfnormal"] = "uniform",
        l1_weight: float = 1.0,
        perceptual: Literal["encoder", "lpips", "none"] = "encoder",
        perceptual_weight: float = 1.0,
        lpips_weights: str | Sequence[str] | None = None,
        discriminator: Literal["encoder", "dino", "none"] = "encoder",
        dino_weights: str | None = None,
        gan_weight: float = 0.75,
        gan_start_step: int = 20_016,
        disc_start_step: int = 15_012,
        max_adaptive_weight: float = 1e4,
        disc_lr: float = 2e-4,
        disc_betas: tuple[float, float] = (0.9, 0.95),
        disc_weight_decay: float = 0.0,
        disc_lr_schedule: Callable[[int], float] | None = None,
        diffaug: bool = True,
        diffaug_prob: float = 1.0,
        diffaug_translation: float = 0.125,
        disc_layers: Sequence[int] | None = None,
        disc_kernel_size: int = 9,
        perceptual_layers: Sequence[int] | None = None,
    ):
        super().__init__()
        if not isinstance(encoder, RepresentationEncoder):
            raise ConfigError(f"encoder must be a RepresentationEncoder, got {type(encoder).__name__}")
        if noise_dist not in NOISE_DISTRIBUTIONS:
            raise ConfigError(f"noise_dist must be one of {NOISE_DISTRIBUTIONS}, got {noise_dist!r}")
        if perceptual not in PERCEPTUAL_KINDS:
            raise ConfigError(f"perceptual must be one of {PERCEPTUAL_KINDS}, got {perceptual!r}")
        if discriminator not in DISCRIMINATOR_KINDS:
            raise ConfigError(f"discriminator must be one of {DISCRIMINATOR_KINDS}, got {discriminator!r}")
        numbers = dict(noise_tau=noise_tau, l1_weight=l1_weight, perceptual_weight=perceptual_weight,
                       gan_weight=gan_weight, max_adaptive_weight=max_adaptive_weight, disc_lr=disc_lr,
                       gan_start_step=gan_start_step, disc_start_step=disc_start_step)
        for name, value in numbers.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0 <= diffaug_prob <= 1:
            raise ConfigError(f"diffaug_prob must be in [0, 1], got {diffaug_prob}")

        self.encoder = encoder
        self.noise_tau, self.noise_dist = float(noise_tau), noise_dist
        self.l1_weight, self.perceptual_weight = float(l1_weight), float(perceptual_weight)
        self.gan_weight = float(gan_weight)
        self.gan_start_step, self.disc_start_step = int(gan_start_step), int(disc_start_step)
        self.max_adaptive_weight = float(max_adaptive_weight)
        self.disc_lr, self.disc_lr_schedule = float(disc_lr), disc_lr_schedule
        self.diffaug, self.diffaug_prob = bool(diffaug), float(diffaug_prob)
        self.diffaug_translation = float(diffaug_translation)
        self.last_stats: dict[str, Tensor] = {}
        self._disc_synced = False

        depth = encoder_depth(encoder)
        quarters = default_key_depths(depth) if depth else ()

        self.perceptual: nn.Module | None = None
        if perceptual == "encoder":
            # The last block's output is the final tokens before their LayerNorm: counted once, as the final map.
            default = tuple(d for d in quarters if d != depth - 1)
            layers = tuple(perceptual_layers) if perceptual_layers is not None else default
            self.perceptual = EncoderPerceptual(EncoderFeatureMaps(encoder, layers))
        elif perceptual == "lpips":
            if not lpips_weights:
                raise ConfigError(
                    f"perceptual='lpips' needs lpips_weights: a folder with {VGG16_FILE} and {LPIPS_LIN_FILE}"
                )
            self.perceptual = LPIPS.from_spec(lpips_weights)

        self.discriminator: TokenDiscriminator | None = None
        if discriminator == "encoder":
            layers = tuple(disc_layers) if disc_layers is not None else quarters
            features = _EncoderDiscFeatures(EncoderFeatureMaps(encoder, layers))
            self.discriminator = TokenDiscriminator(features, encoder.hidden_size, disc_kernel_size)
        elif discriminator == "dino":
            if not dino_weights:
                raise ConfigError("discriminator='dino' needs dino_weights: a local dino_vit_small_patch8_224.pth")
            vit = DinoViT.from_file(dino_weights)
            layers = tuple(disc_layers) if disc_layers is not None else DINO_KEY_DEPTHS
            self.discriminator = TokenDiscriminator(_DinoDiscFeatures(vit, layers), vit.dim, disc_kernel_size)

        self.disc_optimizer: torch.optim.Optimizer | None = None
        if self.discriminator is not None:
            # Heads train only inside discriminator_step; elsewhere no gradient may reach them.
            self.discriminator.heads.requires_grad_(False)
            self.disc_optimizer = torch.optim.AdamW(
                self.discriminator.heads.parameters(), lr=disc_lr, betas=tuple(disc_betas), eps=1e-8,
                weight_decay=disc_weight_decay,
            )

    # -- generator side ---------------------------------------------------------------------------

    def reconstruct(self, net: nn.Module, x: Tensor, noise: bool) -> Tensor:
        """D(E(x) [+ noise]) mapped back to [0, 1] (not clamped); the encoder runs without gradients."""
        with torch.no_grad():
            tokens = self.encoder(x)
        if noise and self.noise_tau > 0:
            tokens = noise_tokens(tokens, self.noise_tau, self.noise_dist)
        return net(tokens) * self.encoder.image_std + self.encoder.image_mean

    def _augment(self, x: Tensor) -> Tensor:
        return diff_augment(x, self.diffaug_prob, self.diffaug_translation) if self.diffaug else x

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and self.gan_weight > 0 and step >= self.gan_start_step

    def forward(self, net: nn.Module, x: Tensor, y: Tensor | None = None, step: int = 0) -> Tensor:
        """Per-sample generator losses [B] (labels `y` are unused). `net` is the decoder, possibly DDP-wrapped."""
        _check_images(x, "DecoderLoss")
        recon = self.reconstruct(net, x, noise=True)
        l1 = (recon - x).abs().flatten(1).mean(dim=1)
        rec = self.l1_weight * l1
        stats = {"l1": l1.detach().mean()}
        if self.perceptual is not None and self.perceptual_weight > 0:
            p = self.perceptual(recon, x)
            rec = rec + self.perceptual_weight * p
            stats["perceptual"] = p.detach().mean()
        total = rec
        if self.gan_active(step) and torch.is_grad_enabled():
            self._sync_discriminator()
            logits = self.discriminator(self._augment(recon * 2 - 1))
            gan = -logits.flatten(1).mean(dim=1)  # L_G spread per sample; its batch mean is -mean D(.)
            weight = adaptive_weight(rec.mean(), gan.mean(), _unwrap(net).decoder_pred.weight, self.max_adaptive_weight)
            total = total + self.gan_weight * weight * gan
            stats.update(gan=gan.detach().mean(), adaptive_weight=weight)
        self.last_stats = stats
        return total

    # -- discriminator side -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _heads_trainable(self):
        heads = self.discriminator.heads
        heads.requires_grad_(True)
        try:
            yield
        finally:
            heads.requires_grad_(False)

    def _sync_discriminator(self) -> None:
        """Once per process: every rank takes rank 0's heads (ranks may have been seeded differently)."""
        if self._disc_synced:
            return
        self._disc_synced = True
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for tensor in list(self.discriminator.heads.parameters()) + list(self.discriminator.heads.buffers()):
                dist.broadcast(tensor.data, src=0)

    def discriminator_loss(self, net: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(hinge loss, logits on real, logits on fake) for images x in [0, 1]; fakes are quantised no-grad
        reconstructions from un-noised tokens, both sides DiffAugmented."""
        with torch.no_grad():
            fake = quantize_8bit(self.reconstruct(_unwrap(net), x, noise=False) * 2 - 1)
            real = x * 2 - 1
            # Independent draws for the two halves; one forward over both (the heads normalise per sample).
            both = torch.cat([self._augment(real), self._augment(fake)])
        logits = self.discriminator(both)
        logits_real, logits_fake = logits.chunk(2)
        return hinge_d_loss(logits_real, logits_fake), logits_real, logits_fake

    def discriminator_step(self, net: nn.Module, x: Tensor, step: int) -> dict[str, float]:
        """One AdamW update of the discriminator heads (only once step >= disc_start_step, else {}).

        Under torch.distributed the head gradients are averaged over ranks before the step.
        """
        if self.discriminator is None or step < self.disc_start_step:
            return {}
        _check_images(x, "DecoderLoss.discriminator_step")
        self._sync_discriminator()
        lr = self.disc_lr * (self.disc_lr_schedule(step) if self.disc_lr_schedule is not None else 1.0)
        for group in self.disc_optimizer.param_groups:
            group["lr"] = lr
        with self._heads_trainable():
            loss, logits_real, logits_fake = self.discriminator_loss(net, x)
            self.disc_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._all_reduce_grads()
            self.disc_optimizer.step()
        return {
            "disc_loss": float(loss.detach()),
            "disc_logits_real": float(logits_real.detach().mean()),
            "disc_logits_fake": float(logits_fake.detach().mean()),
            "disc_lr": lr,
        }

    def _all_reduce_grads(self) -> None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        grads = [p.grad for p in self.discriminator.heads.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective instead of one per tensor
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    # -- checkpointing ----------------------------------------------------------------------------

    def state_dict(self, *args, **kwargs) -> dict:
        """{"discriminator": heads' tensors, "disc_optimizer": AdamW state}; empty without a discriminator.

        Frozen weights (encoder, VGG, DINO) are never included. Meant for a top-level object (the training
        engine), not for nesting inside another module's state dict.
        """
        if self.discriminator is None:
            return {}
        heads = {k: v.detach().clone() for k, v in self.discriminator.heads.state_dict().items()}
        return {"discriminator": heads, "disc_optimizer": self.disc_optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict, strict: bool = True, assign: bool = False):
        """Restore what `state_dict()` wrote; a missing / extra / mis-shaped key raises `CheckpointError`."""
        source = "DecoderLoss state"
        if self.discriminator is None:
            if state_dict and strict:
                raise CheckpointError(
                    f"{source}: holds discriminator entries {sorted(state_dict)} but this loss has none"
                )
            return None
        for key in ("discriminator", "disc_optimizer"):
            if key not in state_dict:
                raise CheckpointError(f"{source}: missing key {key!r} (saved without a discriminator?)")
        load_state_dict_strict(self.discriminator.heads, state_dict["discriminator"], f"{source}['discriminator']")
        try:
            self.disc_optimizer.load_state_dict(state_dict["disc_optimizer"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{source}['disc_optimizer']: does not match the discriminator ({err})") from None
        self._disc_synced = False
        return None


#################################################################################
#                                   Files                                       #
#################################################################################


def _tensor_dict(obj: dict, source: str) -> dict[str, Tensor]:
    """The flat tensor dict of a weights file, unwrapping a single 'model' / 'state_dict' level."""
    for key in ("model", "state_dict"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{source}: entries that are not tensors: {bad[:8]}")
    return dict(obj)


def _require(state: dict[str, Tensor], key: str, source: str) -> Tensor:
    if key not in state:
        raise CheckpointError(f"{source}: missing key {key!r}")
    return state[key]
