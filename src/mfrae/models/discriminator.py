"""The decoder stage's discriminator: trainable token heads on the maps of a frozen feature network.

    images in [-1, 1] -> frozen features (token maps [B, N, C]) -> one `TokenHead` per map -> logits [B, sum N]

The features are either a frozen DINO ViT-S/8 (`DinoViT`, the RAE recipe, arXiv 2510.11690) or the frozen
representation encoder itself (mfrae's default, needing no extra weight file). The head design is the DINO
discriminator of StyleGAN-T (arXiv 2301.09515); reference details in docs/rae.md. Only `TokenDiscriminator.heads`
train; how, and with which loss, is the business of `mfrae.train.gan`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from mfrae.checkpoint import load_state_dict_strict
from mfrae.errors import CheckpointError, ConfigError
from mfrae.layers import Attention, PatchEmbed
from mfrae.models.encoders import IMAGENET_MEAN, IMAGENET_STD
from mfrae.models.perceptual import EncoderFeatureMaps, FrozenModule, read_weights, require_tensor

DINO_KEY_DEPTHS = (2, 5, 8, 11)  # blocks of DINO ViT-S/8 whose outputs feed the heads (docs/rae.md)

#################################################################################
#                           Frozen DINO ViT-S/8                                 #
#################################################################################


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


class DinoViT(FrozenModule):
    """Frozen DINO (v1, Caron et al., arXiv 2104.14294) ViT, ViT-S/8 by default, with timm key names:
    `patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
    mlp.fc2}`, `norm`.

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
        state = {k: v for k, v in read_weights(path).items() if not k.startswith("head.")}
        proj = require_tensor(state, "patch_embed.proj.weight", source)
        pos = require_tensor(state, "pos_embed", source)
        fc1 = require_tensor(state, "blocks.0.mlp.fc1.weight", source)
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


#################################################################################
#                     Feature adapters (images in [-1, 1])                      #
#################################################################################


class EncoderDiscFeatures(nn.Module):
    """Discriminator input in [-1, 1] -> the encoder's [0, 1] input -> its token maps."""

    def __init__(self, maps: EncoderFeatureMaps):
        super().__init__()
        self.maps = maps

    @property
    def num_maps(self) -> int:
        return self.maps.num_maps

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.maps((x + 1) / 2)


class DinoDiscFeatures(nn.Module):
    """The DINO ViT's final patch tokens, then its block outputs at `depths`."""

    def __init__(self, vit: DinoViT, depths: Sequence[int] = DINO_KEY_DEPTHS):
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
#                                Token heads                                    #
#################################################################################


class BatchNormLocal(nn.Module):
    """Normalisation over the tokens of each sample, per channel (BatchNorm with a virtual batch of 1):
    y = (x - mean_L x) / sqrt(var_L x + eps) * weight + bias for x [B, C, L]. Per sample, so real and fake
    images may share one forward pass."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight[:, None] + self.bias[:, None]


class CircularConv1d(nn.Conv1d):
    """Conv1d with circular padding done by indexing, so any number of tokens works (even fewer than the kernel)."""

    def forward(self, x: Tensor) -> Tensor:
        pad = self.kernel_size[0] // 2
        index = torch.arange(-pad, x.shape[-1] + pad, device=x.device) % x.shape[-1]
        return super().forward(x[..., index])


class TokenHead(nn.Module):
    """Discriminator head on one token map [B, C, L] -> logits [B, L], spectrally normalised (arXiv 1802.05957):

        h = LReLU(BNL(SN-Conv1d_k1(x)));  h = (LReLU(BNL(SN-Conv1d_k(h), circular)) + h) / sqrt 2;  SN-Conv1d_k1(h) -> 1
    """

    def __init__(self, channels: int, kernel_size: int = 9):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"the head's kernel size must be odd (circular padding of k // 2), got {kernel_size}")
        self.proj = nn.Sequential(
            spectral_norm(nn.Conv1d(channels, channels, 1)), BatchNormLocal(channels), nn.LeakyReLU(0.2)
        )
        self.residual = nn.Sequential(
            spectral_norm(CircularConv1d(channels, channels, kernel_size)), BatchNormLocal(channels), nn.LeakyReLU(0.2)
        )
        self.out = spectral_norm(nn.Conv1d(channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x)
        h = (self.residual(h) + h) / math.sqrt(2)
        return self.out(h).squeeze(1)


class TokenDiscriminator(nn.Module):
    """Trainable heads on frozen token maps: images in [-1, 1] -> logits [B, sum of tokens over maps].

    `features` is a frozen module with a `num_maps` property returning that many maps [B, N, channels]."""

    def __init__(self, features: nn.Module, channels: int, kernel_size: int = 9):
        super().__init__()
        self.features = features
        self.heads = nn.ModuleList([TokenHead(channels, kernel_size) for _ in range(features.num_maps)])

    def forward(self, x: Tensor) -> Tensor:
        maps = self.features(x)
        return torch.cat([head(m.transpose(1, 2)) for head, m in zip(self.heads, maps)], dim=1)
