"""Transformer building blocks shared by the DiT^DH backbone and the RAE decoder.

Written here instead of imported from timm (which would pull torchvision and a CUDA torch).
Every layer keeps the parameter names of the official RAE code so released checkpoints load strictly.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def float32_region(device: torch.device) -> contextlib.AbstractContextManager:
    """A region that runs in float32 whatever the caller's autocast (a no-op where autocast does not exist,
    e.g. on the meta device used for FLOP counting)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def strict_float32_region(device: torch.device):
    """`float32_region`, and on CUDA also without TF32 in matmuls and cuDNN convolutions (PyTorch lets cuDNN
    convolutions, e.g. the patch embedding, use TF32 by default: its 10-bit mantissa turns a finite difference
    of two outputs 1e-2 apart into a 1e-2 relative error). For computations whose precision is the point, such
    as the finite-difference stencil. The flags are process-wide and restored on exit."""
    if device.type != "cuda":
        with float32_region(device):
            yield
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with float32_region(device):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


#################################################################################
#                              Normalisation                                    #
#################################################################################


class RMSNorm(nn.Module):
    """RMSNorm(x) = x / sqrt(mean(x^2) + eps) * weight, the statistic computed in float32.

    The float32 reduction keeps bf16 training stable; the result is cast back before the scale.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def unpatchify(x: Tensor, patch_size: int, channels: int) -> Tensor:
    """[B, g*g, p*p*C] -> [B, C, g*p, g*p]; each token's outputs are ordered (pixel row, pixel column, channel)."""
    B, N, _ = x.shape
    g = math.isqrt(N)
    if g * g != N:
        raise ValueError(f"cannot unpatchify {N} tokens: not a square grid")
    x = x.reshape(B, g, g, patch_size, patch_size, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, channels, g * patch_size, g * patch_size)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation x * (1 + scale) + shift (shift/scale broadcast over tokens when per-sample)."""
    return x * (1 + scale) + shift


def broadcast_time(value: Tensor | float, x: Tensor, name: str = "time", dtype: torch.dtype | None = None) -> Tensor:
    """A time given as a scalar or one per sample, as a [B] tensor on x's device (B = x.shape[0]).

    `dtype` defaults to x's dtype. A scalar is expanded (a view); any other shape than [B] raises
    ValueError naming the argument `name`.
    """
    value = torch.as_tensor(value, device=x.device, dtype=x.dtype if dtype is None else dtype)
    if value.dim() == 0:
        value = value.expand(x.shape[0])
    if value.shape != (x.shape[0],):
        raise ValueError(f"{name} must be a scalar or have shape [{x.shape[0]}], got {tuple(value.shape)}")
    return value


#################################################################################
#                       Fixed position tables                                   #
#################################################################################


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """MAE 1-D table: [sin(p * w_m), cos(p * w_m)] with w_m = 10000^(-m / (dim/2)), m < dim/2."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_size: int) -> Tensor:
    """MAE 2-D table [grid^2, dim] for row-major tokens k = i * grid + j (i = row, j = column).

    Layout (the one stored in the released checkpoints, docs/checkpoints.md, section 6): the first dim/2
    channels encode the column j, the last dim/2 the row i, each as [sin..., cos...]. Computed in float64
    like the reference, returned as float32.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    emb_col = sincos_1d(dim // 2, cols.reshape(-1))
    emb_row = sincos_1d(dim // 2, rows.reshape(-1))
    return torch.cat([emb_col, emb_row], dim=1).float()


class RotaryEmbedding2D(nn.Module):
    """2-D RoPE with interleaved pairs (EVA `VisionRotaryEmbeddingFast` layout).

    For head dimension d each axis gets d/2 channels with frequencies f_k = 10000^(-2k / (d/2)),
    k < d/4, each repeated twice. Token (i, j) has angles [i f_0, i f_0, i f_1, ..., j f_0, j f_0, ...]
    (rows first, then columns). q' = q cos + rot(q) sin, where rot maps each pair (a, b) to (-b, a).
    The tables are persistent buffers because released checkpoints store them.
    """

    def __init__(self, head_dim: int, grid_size: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs a head dimension divisible by 4, got {head_dim}")
        half = head_dim // 2
        freqs = 1.0 / theta ** (torch.arange(0, half, 2).float() / half)  # [d/4]
        pos = torch.arange(grid_size).float()
        axis = torch.repeat_interleave(pos[:, None] * freqs[None, :], 2, dim=-1)  # [G, d/2]
        angles = torch.cat(
            [axis[:, None, :].expand(grid_size, grid_size, half), axis[None, :, :].expand(grid_size, grid_size, half)],
            dim=-1,
        ).reshape(grid_size * grid_size, head_dim)
        self.register_buffer("freqs_cos", angles.cos())
        self.register_buffer("freqs_sin", angles.sin())

    @staticmethod
    def rotate_pairs(x: Tensor) -> Tensor:
        a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack([-b, a], dim=-1).flatten(-2)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, heads, N, d] with N = grid^2 tokens in row-major order."""
        return x * self.freqs_cos + self.rotate_pairs(x) * self.freqs_sin


#################################################################################
#                           Embedding layers                                    #
#################################################################################


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens [B, (H/p)(W/p), D], row-major (a strided Conv2d)."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by patch size {patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"expected inputs of spatial size {self.input_size}x{self.input_size}, got {tuple(x.shape[-2:])}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class GaussianFourierEmbedding(nn.Module):
    """Scalar time embedding: phi(t) = [sin(2 pi t W), cos(2 pi t W)], then Linear -> SiLU -> Linear.

    W ~ N(0, I_256) is drawn once and frozen; it is a (non-trainable) parameter so checkpoints carry it.
    t is used as is in [0, 1] (no x1000 scaling).
    """

    def __init__(self, dim: int, num_frequencies: int = 256):
        super().__init__()
        self.W = nn.Parameter(torch.randn(num_frequencies), requires_grad=False)
        self.mlp = nn.Sequential(nn.Linear(2 * num_frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        # Float32 throughout, even under autocast: sin/cos of large arguments lose all precision in bf16,
        # and MeanFlow's finite-difference step (5e-3 in t) must survive the embedding (docs/benchmarks.md).
        with float32_region(t.device):
            angles = t.float()[:, None] * self.W.float()[None, :] * (2 * math.pi)
            features = torch.cat([angles.sin(), angles.cos()], dim=-1)
            return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class table with one extra row: index `num_classes` is the null class used for guidance.

    Label dropout is the objective's job, not the model's (it happens once per sample there).
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: Tensor) -> Tensor:
        return self.embedding_table(y)


#################################################################################
#                       Attention and feed-forward                              #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (rows ordered q, k, v; heads major)
    and optional RoPE on q and k, computed by `scaled_dot_product_attention`."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: RotaryEmbedding2D | None = None) -> Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = rope(q), rope(k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


def swiglu_hidden(dim: int, mlp_ratio: float = 4.0) -> int:
    """SwiGLU hidden width int(2/3 * int(mlp_ratio * dim)): 3072 for D = 1152, 5461 for D = 2048."""
    return int(2 * int(dim * mlp_ratio) / 3)


class SwiGLU(nn.Module):
    """FFN(x) = w3(SiLU(a) * b) with [a, b] = w12(x) (the first half goes through SiLU)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)
