"""DiT^DH: a diffusion transformer with a wide, shallow DDT head (RAE, arXiv 2510.11690),
and its MeanFlow form (MF-RAE, arXiv 2511.13019) that also embeds the interval t - r.

One class serves both roles.

    teacher  (interval_embedding=False):  v = model(x, t, y)         instantaneous velocity
    student  (interval_embedding=True):   u = model(x, t, y, r=r)    average velocity over [r, t]

Convention, used everywhere in mfrae: t = 1 is noise, t = 0 is data, r <= t, and
z_r = z_t - (t - r) * u(z_t, r, t). Calling a student without r means r = t, so u(z, t, t) is its
instantaneous velocity. (The official MF-RAE code orders the arguments (x, r, t, y) and reads r=None
as r = 0; the checkpoint loaders hide that difference.)

Forward (RAE, arXiv 2510.11690, its DiT^DH with a wide DDT head; the details follow the official `DiTwDDTHead`, docs/checkpoints.md):
    c  = SiLU(e_t(t) [+ e_Delta(t - r)] + e_y(y))                   per-sample condition
    s  = blocks_enc(PatchEmbed_s(x) + pos, c)                          backbone, RoPE, adaLN
    s  = s_proj(SiLU(e_t(t) [+ e_Delta(t - r)] + s))                   per-token condition
    h  = blocks_head(PatchEmbed_x(x), s)                               head re-embeds the noisy input
    out = Linear(RMSNorm(h) * (1 + scale(s)) + shift(s))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mfrae.layers import (
    Attention,
    GaussianFourierEmbedding,
    LabelEmbedder,
    PatchEmbed,
    RMSNorm,
    RotaryEmbedding2D,
    SwiGLU,
    broadcast_time,
    modulate,
    sincos_2d,
    swiglu_hidden,
    unpatchify,
)

#################################################################################
#                                 Config                                        #
#################################################################################


@dataclass(frozen=True)
class DiTDHConfig:
    """Constructor arguments. Widths, depths and heads are (backbone, head) pairs as in the official configs."""

    input_size: int = 16
    patch_size: int = 1
    in_channels: int = 768
    hidden_size: tuple[int, int] = (1152, 2048)
    depth: tuple[int, int] = (28, 2)
    num_heads: tuple[int, int] = (16, 16)
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    interval_embedding: bool = False

    def __post_init__(self):
        for name in ("hidden_size", "depth", "num_heads"):
            value = getattr(self, name)
            if len(value) != 2:
                raise ValueError(f"DiTDHConfig.{name} must be a (backbone, head) pair, got {value!r}")
            object.__setattr__(self, name, tuple(int(v) for v in value))

    def to_dict(self) -> dict:
        return asdict(self)


# Official sizes: backbone (width, depth, heads); every size uses the 2048 x 2 x 16 DDT head (RAE, arXiv 2510.11690;
# where each size comes from: docs/checkpoints.md, section 3).
DIT_DH_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
DDT_HEAD = (2048, 2, 16)


def dit_dh_config(size: str, input_size: int = 16, interval_embedding: bool = False, **overrides) -> DiTDHConfig:
    """Named preset: `size` in S/B/L/XL; input_size 16 for 256px RAE latents, 32 for 512px."""
    key = size.upper()
    if key not in DIT_DH_SIZES:
        raise ValueError(f"unknown DiT^DH size {size!r}; choose one of {sorted(DIT_DH_SIZES)}")
    width, depth, heads = DIT_DH_SIZES[key]
    fields = dict(
        input_size=input_size,
        hidden_size=(width, DDT_HEAD[0]),
        depth=(depth, DDT_HEAD[1]),
        num_heads=(heads, DDT_HEAD[2]),
        interval_embedding=interval_embedding,
    )
    fields.update(overrides)
    return DiTDHConfig(**fields)


# The official flags this implementation realises; any other value would change the function.
_OFFICIAL_FIXED_FLAGS = {
    "use_qknorm": False,
    "use_swiglu": True,
    "use_rope": True,
    "use_rmsnorm": True,
    "wo_shift": False,
    "use_pos_embed": True,
}


def config_from_official(kwargs: dict, interval_embedding: bool) -> DiTDHConfig:
    """Translate the official `DiTwDDTHead(**kwargs)` constructor arguments into a DiTDHConfig."""
    kwargs = dict(kwargs)
    for flag, value in _OFFICIAL_FIXED_FLAGS.items():
        if flag in kwargs and bool(kwargs.pop(flag)) != value:
            raise ValueError(f"official DiT^DH option {flag}={not value} is not supported (only {flag}={value})")
    kwargs.pop("class_dropout_prob", None)  # label dropout lives in the objectives
    kwargs.pop("learn_sigma", None)
    known = {f for f in DiTDHConfig.__dataclass_fields__ if f != "interval_embedding"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"unknown official DiT^DH arguments: {unknown}")
    return DiTDHConfig(interval_embedding=interval_embedding, **kwargs)


#################################################################################
#                                 Blocks                                        #
#################################################################################


class DiTDHBlock(nn.Module):
    """Pre-norm transformer block with 6-way adaLN (shift, scale, gate for attention and FFN).

    x <- x + g1 * Attn(RMSNorm(x) * (1 + a1) + b1)
    x <- x + g2 * SwiGLU(RMSNorm(x) * (1 + a2) + b2),   [b1, a1, g1, b2, a2, g2] = Linear(SiLU(c))
    c is per sample [B, D] (backbone) or per token [B, N, D] (head).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.norm2 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor, rope: RotaryEmbedding2D) -> Tensor:
        if c.dim() == 2:
            c = c.unsqueeze(1)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """out = Linear(RMSNorm(h) * (1 + scale) + shift), [shift, scale] = Linear(SiLU(s)) per token; no gate."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = RMSNorm(dim)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, h: Tensor, s: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(s).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(h), shift, scale))


#################################################################################
#                                  DiT^DH                                       #
#################################################################################


class DiTDH(nn.Module):
    """DiT^DH velocity model (teacher) or average-velocity model (MeanFlow student); see the module docstring."""

    def __init__(self, config: DiTDHConfig = DiTDHConfig()):
        super().__init__()
        self.config = config
        (enc_dim, head_dim), (enc_depth, head_depth) = config.hidden_size, config.depth
        enc_heads, head_heads = config.num_heads
        p, C = config.patch_size, config.in_channels
        grid = config.input_size // p
        self.num_classes = config.num_classes
        self.enc_depth = enc_depth
        self.grad_checkpointing = False

        # Registration order follows the official state dict.
        self.pos_embed = nn.Parameter(sincos_2d(enc_dim, grid)[None], requires_grad=False)
        self.x_embedder = PatchEmbed(config.input_size, p, C, head_dim)
        self.s_embedder = PatchEmbed(config.input_size, p, C, enc_dim)
        self.s_projector = nn.Linear(enc_dim, head_dim) if enc_dim != head_dim else nn.Identity()
        self.t_embedder = GaussianFourierEmbedding(enc_dim)
        self.r_embedder = GaussianFourierEmbedding(enc_dim) if config.interval_embedding else None
        self.y_embedder = LabelEmbedder(config.num_classes, enc_dim)
        self.final_layer = FinalLayer(head_dim, p * p * C)
        self.enc_feat_rope = RotaryEmbedding2D(enc_dim // enc_heads, grid)
        self.dec_feat_rope = RotaryEmbedding2D(head_dim // head_heads, grid)
        self.blocks = nn.ModuleList(
            [DiTDHBlock(enc_dim, enc_heads, config.mlp_ratio) for _ in range(enc_depth)]
            + [DiTDHBlock(head_dim, head_heads, config.mlp_ratio) for _ in range(head_depth)]
        )
        self.initialize_weights()

    @property
    def is_meanflow(self) -> bool:
        return self.r_embedder is not None

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.config.in_channels, self.config.input_size, self.config.input_size)

    def initialize_weights(self) -> None:
        """Official init (docs/checkpoints.md, section 3): adaLN and output layers zero, so a fresh model predicts 0."""
        for embedder in (self.x_embedder, self.s_embedder):
            nn.init.xavier_uniform_(embedder.proj.weight.view(embedder.proj.weight.shape[0], -1))
            nn.init.zeros_(embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # ----------------------------------------------------------------------------------------

    def _check_inputs(self, x: Tensor, y: Tensor) -> None:
        expected = self.latent_shape
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"DiT^DH expects latents of shape [B, {', '.join(map(str, expected))}], got {tuple(x.shape)}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"labels must have shape [{x.shape[0]}], got {tuple(y.shape)}")

    def _run(self, block: DiTDHBlock, x: Tensor, c: Tensor, rope: RotaryEmbedding2D) -> Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, c, rope, use_reentrant=False)
        return block(x, c, rope)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor, r: Tensor | float | None = None) -> Tensor:
        """Velocity v(x, t, y) for a teacher; average velocity u(x, r, t, y) for a student (r = t when omitted)."""
        self._check_inputs(x, y)
        t = broadcast_time(t, x, "t", dtype=torch.float32)
        time_cond = self.t_embedder(t)
        if self.r_embedder is not None:
            r = t if r is None else broadcast_time(r, x, "r", dtype=torch.float32)
            time_cond = time_cond + self.r_embedder(t - r)
        elif r is not None:
            raise ValueError("this DiT^DH has no interval embedding (a flow-matching teacher); call it without r")
        time_cond = time_cond.to(self.pos_embed.dtype)

        c = F.silu(time_cond + self.y_embedder(y))
        s = self.s_embedder(x) + self.pos_embed
        for block in self.blocks[: self.enc_depth]:
            s = self._run(block, s, c, self.enc_feat_rope)
        s = self.s_projector(F.silu(time_cond.unsqueeze(1) + s))  # the label enters the head only via s

        h = self.x_embedder(x)
        for block in self.blocks[self.enc_depth :]:
            h = self._run(block, h, s, self.dec_feat_rope)
        return unpatchify(self.final_layer(h, s), self.config.patch_size, self.config.in_channels)


def dit_dh(size: str, input_size: int = 16, interval_embedding: bool = False, **overrides) -> DiTDH:
    """Build a preset DiT^DH, e.g. `dit_dh("XL")` (teacher) or `dit_dh("XL", interval_embedding=True)`."""
    return DiTDH(dit_dh_config(size, input_size, interval_embedding, **overrides))


__all__ = ["DiTDH", "DiTDHConfig", "DIT_DH_SIZES", "dit_dh", "dit_dh_config", "config_from_official"]
