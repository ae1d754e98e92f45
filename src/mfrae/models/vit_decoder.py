"""RAE pixel decoder: an MAE-style ViT that maps representation tokens back to image patches
(RAE, arXiv 2510.11690; the official `GeneralDecoder`, file layout in docs/checkpoints.md, section 5).

    tokens [B, N, C_enc] -> Linear -> [CLS; tokens] + fixed 2-D sin-cos pos-emb
                         -> L pre-LN ViT layers -> LayerNorm -> Linear(D -> p*p*3) -> drop CLS -> unpatchify

The output lives in the encoder's normalised image space (before the ImageNet mean/std are undone);
`RAE.decode` maps it back to [0, 1]. Module names follow the official (HF ViTMAE) layout so released
`model.pt` files load strictly.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mfrae.layers import sincos_2d, unpatchify

#################################################################################
#                                 Config                                        #
#################################################################################


@dataclass(frozen=True)
class ViTDecoderConfig:
    encoder_hidden_size: int = 768  # C_enc, the width of the representation tokens
    hidden_size: int = 1152
    num_layers: int = 28
    num_heads: int = 16
    intermediate_size: int = 4096
    patch_size: int = 16
    num_patches: int = 256  # tokens of the training resolution (256 -> 256px, 1024 -> 512px at p = 16)
    num_channels: int = 3
    layer_norm_eps: float = 1e-12

    def __post_init__(self):
        if math.isqrt(self.num_patches) ** 2 != self.num_patches:
            raise ValueError(f"ViTDecoderConfig.num_patches must be a square number, got {self.num_patches}")

    @property
    def image_size(self) -> int:
        return self.patch_size * math.isqrt(self.num_patches)

    def to_dict(self) -> dict:
        return asdict(self)


# (width, layers, heads, MLP) of the released ViT-B / L / XL decoders (RAE, arXiv 2510.11690, Table 1b; the widths
# are those of the official decoder configs, docs/checkpoints.md, section 5).
VIT_DECODER_SIZES: dict[str, tuple[int, int, int, int]] = {
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "XL": (1152, 28, 16, 4096),
}


def vit_decoder_config(size: str, num_patches: int = 256, encoder_hidden_size: int = 768, **overrides) -> ViTDecoderConfig:
    key = size.upper()
    if key not in VIT_DECODER_SIZES:
        raise ValueError(f"unknown ViT decoder size {size!r}; choose one of {sorted(VIT_DECODER_SIZES)}")
    width, layers, heads, mlp = VIT_DECODER_SIZES[key]
    fields = dict(
        encoder_hidden_size=encoder_hidden_size,
        hidden_size=width,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=mlp,
        num_patches=num_patches,
    )
    fields.update(overrides)
    return ViTDecoderConfig(**fields)


def config_from_official(kwargs: dict) -> ViTDecoderConfig:
    """Translate the official decoder JSON fields (`decoder_hidden_size`, ...) into a ViTDecoderConfig."""
    if kwargs.get("hidden_act", "gelu") != "gelu" or not kwargs.get("qkv_bias", True):
        raise ValueError("only hidden_act='gelu' with qkv_bias=True is supported (the released decoders)")
    return ViTDecoderConfig(
        encoder_hidden_size=int(kwargs["hidden_size"]),
        hidden_size=int(kwargs["decoder_hidden_size"]),
        num_layers=int(kwargs["decoder_num_hidden_layers"]),
        num_heads=int(kwargs["decoder_num_attention_heads"]),
        intermediate_size=int(kwargs["decoder_intermediate_size"]),
        patch_size=int(kwargs["patch_size"]),
        num_patches=int(kwargs["num_patches"]),
        num_channels=int(kwargs.get("num_channels", 3)),
        layer_norm_eps=float(kwargs.get("layer_norm_eps", 1e-12)),
    )


#################################################################################
#                      ViT layer (official parameter names)                     #
#################################################################################


class _Dense(nn.Module):
    """A Linear kept under the name `dense`, to match the official key layout."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense(x)


class _QKV(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)


class DecoderAttention(nn.Module):
    """softmax(Q K^T / sqrt(d_head)) V over all tokens, separate q/k/v projections."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.attention = _QKV(dim)
        self.output = _Dense(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape

        def heads(layer: nn.Linear) -> Tensor:
            return layer(x).reshape(B, N, self.num_heads, D // self.num_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.attention.query), heads(self.attention.key), heads(self.attention.value))
        return self.output(out.transpose(1, 2).reshape(B, N, D))


class DecoderLayer(nn.Module):
    """h <- h + Attn(LN(h));  h <- h + W2 GELU(W1 LN(h))   (pre-LN ViT, exact GELU)."""

    def __init__(self, config: ViTDecoderConfig):
        super().__init__()
        D, eps = config.hidden_size, config.layer_norm_eps
        self.attention = DecoderAttention(D, config.num_heads)
        self.intermediate = _Dense(D, config.intermediate_size)
        self.output = _Dense(config.intermediate_size, D)
        self.layernorm_before = nn.LayerNorm(D, eps=eps)
        self.layernorm_after = nn.LayerNorm(D, eps=eps)

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.attention(self.layernorm_before(h))
        return h + self.output(F.gelu(self.intermediate(self.layernorm_after(h))))


#################################################################################
#                                 Decoder                                       #
#################################################################################


class ViTDecoder(nn.Module):
    def __init__(self, config: ViTDecoderConfig = ViTDecoderConfig()):
        super().__init__()
        self.config = config
        D, N = config.hidden_size, config.num_patches
        pos = torch.cat([torch.zeros(1, D), sincos_2d(D, math.isqrt(N))])  # row 0 (CLS) is zero
        self.decoder_pos_embed = nn.Parameter(pos[None], requires_grad=False)
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.decoder_embed = nn.Linear(config.encoder_hidden_size, D)
        self.decoder_layers = nn.ModuleList([DecoderLayer(config) for _ in range(config.num_layers)])
        self.decoder_norm = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.decoder_pred = nn.Linear(D, config.patch_size**2 * config.num_channels)
        self.grad_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAE-style init: xavier-uniform Linears with zero bias, unit LayerNorms, small CLS token."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.trainable_cls_token, std=0.02)

    def _resize_tokens(self, tokens: Tensor) -> Tensor:
        """Bilinearly resample an off-size token grid to the training grid."""
        B, N, C = tokens.shape
        g, g_train = math.isqrt(N), math.isqrt(self.config.num_patches)
        if g * g != N:
            raise ValueError(f"decoder input has {N} tokens, which is not a square grid")
        grid = tokens.transpose(1, 2).reshape(B, C, g, g)
        grid = F.interpolate(grid, size=(g_train, g_train), mode="bilinear", align_corners=False)
        return grid.flatten(2).transpose(1, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens [B, N, C_enc] in raw encoder space -> pixels [B, 3, H, W] in normalised image space."""
        if tokens.dim() != 3 or tokens.shape[-1] != self.config.encoder_hidden_size:
            raise ValueError(
                f"decoder expects tokens [B, N, {self.config.encoder_hidden_size}], got {tuple(tokens.shape)}"
            )
        if tokens.shape[1] != self.config.num_patches:
            tokens = self._resize_tokens(tokens)
        h = self.decoder_embed(tokens)
        h = torch.cat([self.trainable_cls_token.expand(h.shape[0], -1, -1), h], dim=1) + self.decoder_pos_embed
        for layer in self.decoder_layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, use_reentrant=False)
            else:
                h = layer(h)
        patches = self.decoder_pred(self.decoder_norm(h))[:, 1:]
        return unpatchify(patches, self.config.patch_size, self.config.num_channels)


def vit_decoder(size: str, num_patches: int = 256, encoder_hidden_size: int = 768, **overrides) -> ViTDecoder:
    """Build a preset decoder, e.g. `vit_decoder("XL")` (256 tokens -> 256px) or `vit_decoder("XL", 1024)`."""
    return ViTDecoder(vit_decoder_config(size, num_patches, encoder_hidden_size, **overrides))
