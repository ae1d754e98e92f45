"""A small ViT representation encoder for small images (the bundled digits), registered as "small_vit".

It stands in for DINOv2 where DINOv2's weights cannot be downloaded: same interface, same output
convention (patch tokens standardised over channels by a LayerNorm without affine, no CLS token), so the rest
of the RAE pipeline runs unchanged. Weights come from a safetensors file (`save_small_vit`) or, without
one, from a seeded random initialisation (a fixed random-feature encoder).

    tokens = LN_no_affine(Blocks(PatchEmbed(normalise(x)) + pos))      [B, (S/p)^2, D]

`mfrae.train.small_encoder.train_small_vit` trains the network on a small labelled image set (the digits) so that
its frozen tokens make a useful RAE latent space; see its docstring for the objective. The default config gives a
[64, 4, 4] latent (16 tokens of 64 channels) for 32 px images.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mfrae.layers import Attention, PatchEmbed, sincos_2d
from mfrae.models.encoders import RepresentationEncoder, register_encoder

# Digits are white on black; mean / std of the bundled digits at 32 px, rounded.
DIGITS_MEAN = (0.19, 0.19, 0.19)
DIGITS_STD = (0.33, 0.33, 0.33)


@dataclass(frozen=True)
class SmallViTConfig:
    input_size: int = 32
    patch_size: int = 8
    hidden_size: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    image_mean: tuple[float, float, float] = DIGITS_MEAN
    image_std: tuple[float, float, float] = DIGITS_STD


class Block(nn.Module):
    """Pre-LN ViT block: x + Attn(LN x), then x + MLP(LN x) with exact GELU."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class SmallViT(nn.Module):
    """The trainable network behind the encoder (trained with two linear heads on top by
    `mfrae.train.small_encoder.train_small_vit`)."""

    def __init__(self, config: SmallViTConfig):
        super().__init__()
        self.config = config
        grid = config.input_size // config.patch_size
        self.patch_embed = PatchEmbed(config.input_size, config.patch_size, 3, config.hidden_size)
        self.register_buffer("pos_embed", sincos_2d(config.hidden_size, grid)[None], persistent=False)
        self.blocks = nn.ModuleList([Block(config.hidden_size, config.num_heads, config.mlp_ratio) for _ in range(config.depth)])

    def forward(self, pixels: Tensor) -> Tensor:
        """Normalised pixels -> tokens [B, N, D], standardised per token (LayerNorm without affine)."""
        x = self.patch_embed(pixels) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


@register_encoder("small_vit")
class SmallViTEncoder(RepresentationEncoder):
    name = "small_vit"

    def __init__(
        self,
        path: str | None = None,
        seed: int = 0,
        input_size: int = 32,
        patch_size: int = 8,
        hidden_size: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
    ):
        """With `path`, the weights (and architecture) come from the file; otherwise a seeded random init."""
        super().__init__()
        if path is not None:
            network = load_small_vit(path)
        else:
            config = SmallViTConfig(input_size, patch_size, hidden_size, depth, num_heads, mlp_ratio)
            with torch.random.fork_rng(devices=[]):  # a fixed random-feature encoder; the caller's RNG is untouched
                torch.manual_seed(seed)
                network = SmallViT(config)
        self.network = network
        cfg = network.config
        self.path = path
        self.input_size, self.patch_size, self.hidden_size = cfg.input_size, cfg.patch_size, cfg.hidden_size
        self._set_image_normalisation(cfg.image_mean, cfg.image_std)
        self._freeze()

    def fingerprint(self) -> str:
        """A digest of the weights: two encoders share a fingerprint only if they compute the same function."""
        digest = hashlib.sha1()
        for name, tensor in sorted(self.network.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return f"small_vit:{digest.hexdigest()[:16]}"

    def features(self, pixels: Tensor) -> Tensor:
        return self.network(pixels)


def save_small_vit(network: SmallViT, path: str | Path) -> Path:
    from mfrae.checkpoint import write_safetensors

    return write_safetensors(network.state_dict(), path, "small_vit", asdict(network.config))


def load_small_vit(path: str | Path) -> SmallViT:
    from mfrae.checkpoint import load_state_dict_strict, read_kind

    state, config = read_kind(path, "small_vit")
    network = SmallViT(SmallViTConfig(**config))
    load_state_dict_strict(network, state, str(path))
    return network
