"""Probability path, training-time distributions, the dimension-dependent shift and the MeanFlow pair sampler.

Convention (as MeanFlow, arXiv 2505.13447 Sec. 3, with a_t = 1 - t, b_t = t): t = 1 is noise, t = 0 is data.

    z_t = (1 - t) x + t e,        e ~ N(0, I)                       linear (rectified-flow) path
    v   = dz_t/dt = e - x                                             one-point velocity (of one pair (x, e))
    u(z_t, r, t) = 1/(t - r) int_r^t v(z_tau, tau) dtau,  r <= t      average velocity (MeanFlow Eq. 3)

Training times are drawn from a base distribution p(t) on [low, high] and then pushed through the
resolution-dependent shift of RAE (arXiv 2510.11690; the SD3 time shift)

    shift_a(t) = a t / (1 + (a - 1) t),    a = sqrt(C H W / 4096),

which maps 0 -> 0 and 1 -> 1 and moves mass towards the noisy end when a > 1.

Everything here is a pure function of its inputs and of torch's global RNG.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy import special
from torch import Tensor

from mfrae.distributed import WHOLE_BATCH, BatchPart

TimeKind = Literal["uniform", "logit_normal"]
TIME_KINDS: tuple[str, ...] = ("uniform", "logit_normal")

SHIFT_BASE_DIM = 4096  # the base dimension of the RAE shift (its time_dist_shift_base)


#################################################################################
#                                 Linear path                                   #
#################################################################################


def unsqueeze_like(t: Tensor | float, like: Tensor) -> Tensor:
    """A per-sample value [B] (a time, a gap, a row mask) or a scalar as [B, 1, ..., 1] in the dtype of `like`,
    ready to broadcast against it. (`mfrae.layers.broadcast_time` is the other direction: scalar or [B] -> [B].)"""
    t = torch.as_tensor(t, device=like.device, dtype=like.dtype)
    if t.dim() == 0:
        return t
    if t.dim() != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"time must be a scalar or have shape [{like.shape[0]}], got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def interpolate(x: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
    """z_t = (1 - t) x + t e: data at t = 0, pure noise at t = 1."""
    if x.shape != noise.shape:
        raise ValueError(f"data and noise shapes differ: {tuple(x.shape)} vs {tuple(noise.shape)}")
    t = unsqueeze_like(t, x)
    return (1 - t) * x + t * noise


def one_point_velocity(x: Tensor, noise: Tensor) -> Tensor:
    """The velocity dz_t/dt = e - x of the single pair (x, e): an unbiased one-sample estimate of the marginal
    velocity E[e - x | z_t] (MF-RAE's one-point velocity estimator; v_t of MeanFlow Sec. 3), the regression
    target of flow matching."""
    if x.shape != noise.shape:
        raise ValueError(f"data and noise shapes differ: {tuple(x.shape)} vs {tuple(noise.shape)}")
    return noise - x


#################################################################################
#                                 Time shift                                    #
#################################################################################


def time_shift(t: Tensor | float, shift: float) -> Tensor | float:
    """shift_a(t) = a t / (1 + (a - 1) t); a = 1 is the identity, a > 1 pushes times towards noise (t = 1)."""
    if not shift > 0:
        raise ValueError(f"time shift factor must be > 0, got {shift!r}")
    if shift == 1.0:
        return t
    shifted = shift * t / (1 + (shift - 1) * t)
    # Rounding can land a hair outside [0, 1] (e.g. shift(1) = 1.0000000000000002); times must stay inside.
    return shifted.clamp(0.0, 1.0) if isinstance(shifted, Tensor) else min(max(shifted, 0.0), 1.0)


def dimension_shift(shape: Sequence[int], base_dim: int = SHIFT_BASE_DIM) -> float:
    """a = sqrt(prod(shape) / base_dim) for one latent of `shape` (no batch axis), e.g. (768, 16, 16) -> sqrt(48)."""
    dims = [int(d) for d in shape]
    if not dims or any(d <= 0 for d in dims):
        raise ValueError(f"latent shape must be a non-empty sequence of positive sizes, got {tuple(shape)!r}")
    if base_dim <= 0:
        raise ValueError(f"base_dim must be positive, got {base_dim!r}")
    return math.sqrt(math.prod(dims) / base_dim)


#################################################################################
#                             Time distributions                                #
#################################################################################


@dataclass(frozen=True)
class TimeDistribution:
    """Base distribution p(t) of training times, before the shift.

    kind="uniform":       t ~ U[low, high].
    kind="logit_normal":  t = sigmoid(n), n ~ N(mu, sigma^2), truncated to [low, high] (sampled by the
                          inverse CDF, so low = 0, high = 1 is the plain logit-normal of MeanFlow).

    MeanFlow's default is logit_normal(-0.4, 1) on [0, 1] (arXiv 2505.13447 Sec. 4.3); the RAE flow-matching
    configs and MF-RAE use logit_normal(0, 1) or uniform on [0, 0.999] (docs/meanflow.md).
    """

    kind: TimeKind = "logit_normal"
    mu: float = -0.4
    sigma: float = 1.0
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.low < self.high <= 1.0:
            raise ValueError(f"time bounds must satisfy 0 <= low < high <= 1, got low={self.low!r}, high={self.high!r}")
        if self.kind not in TIME_KINDS:
            raise ValueError(f"unknown time distribution kind {self.kind!r}; choose one of {TIME_KINDS}")
        if self.kind == "logit_normal" and not self.sigma > 0:
            raise ValueError(f"logit-normal sigma must be > 0, got {self.sigma!r}")

    @classmethod
    def uniform(cls, low: float = 0.0, high: float = 1.0) -> TimeDistribution:
        return cls("uniform", low=low, high=high)

    @classmethod
    def logit_normal(
        cls, mu: float = -0.4, sigma: float = 1.0, low: float = 0.0, high: float = 1.0
    ) -> TimeDistribution:
        return cls("logit_normal", mu=mu, sigma=sigma, low=low, high=high)

    def _normal_cdf_bounds(self) -> tuple[float, float]:
        def cdf(p: float) -> float:
            if p <= 0.0:
                return 0.0
            if p >= 1.0:
                return 1.0
            return float(special.ndtr((special.logit(p) - self.mu) / self.sigma))

        return cdf(self.low), cdf(self.high)

    def quantile(self, u: Tensor, shift: float = 1.0) -> Tensor:
        """Inverse CDF of the (shifted) distribution at probabilities u in [0, 1]; the shift is monotone,
        so the shifted quantile is shift_a(Q(u))."""
        if self.kind == "uniform":
            t = self.low + (self.high - self.low) * u
        else:
            lo, hi = self._normal_cdf_bounds()
            p = (lo + (hi - lo) * u).clamp(0.0, 1.0)
            t = torch.sigmoid(self.mu + self.sigma * torch.special.ndtri(p)).clamp(self.low, self.high)
        return time_shift(t, shift)

    def sample(self, n: int, shift: float = 1.0, device: torch.device | str | None = None) -> Tensor:
        """n iid (shifted) times, float32 [n], from torch's global RNG."""
        return self.quantile(torch.rand(n, device=device, dtype=torch.float32), shift)

    def quantile_numpy(self, u: np.ndarray, shift: float = 1.0) -> np.ndarray:
        """Float64 quantile for deterministic quadrature (same function as `quantile`)."""
        if self.kind == "uniform":
            t = self.low + (self.high - self.low) * u
        else:
            lo, hi = self._normal_cdf_bounds()
            p = np.clip(lo + (hi - lo) * u, 0.0, 1.0)
            t = np.clip(special.expit(self.mu + self.sigma * special.ndtri(p)), self.low, self.high)
        return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


@functools.lru_cache(maxsize=4)
def _gauss_legendre_01(num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on [0, 1]."""
    nodes, weights = special.roots_legendre(num_nodes)
    return 0.5 * (nodes + 1.0), 0.5 * weights


#################################################################################
#                               Pair sampler                                    #
#################################################################################


@dataclass(frozen=True)
class PairSampler:
    """(t, r) pairs for MeanFlow (MeanFlow arXiv 2505.13447 Sec. 4.3, "Sampling time steps"; MF-RAE draws
    both times shifted, docs/meanflow.md).

    Two iid times from `time`, both shifted by `shift`, sorted so that r = min <= t = max; then rows keep
    r != t and the others set r := t. The r = t rows therefore carry t = max of the two draws, as in the
    official samplers. Which rows keep r != t (`layout`):
      "random": each row independently with probability `fraction_r_neq_t` (an iid mask, as the PyTorch ports
                and MF-RAE);
      "prefix": exactly k = round(fraction_r_neq_t * G) rows of each optimizer step's global batch of G rows,
                spread over its micro-batches (`BatchPart`s: processes x accumulation) as evenly as whole rows
                allow, and placed first in each micro-batch (the batch order is random already). The count of
                a micro-batch is then fixed per part, so the subset is a static slice: no host-device sync and
                at most two shapes for torch.compile. The realised fraction of a step is the configured one
                to within half a row at any micro-batch size. (The official JAX MeanFlow also uses a fixed
                count, int(fraction * n) rows of each device's batch, put last; with small per-device batches
                that count rounds down to zero.)
    """

    time: TimeDistribution = TimeDistribution()
    shift: float = 1.0
    fraction_r_neq_t: float = 0.25
    layout: Literal["random", "prefix"] = "random"

    def __post_init__(self):
        if not isinstance(self.time, TimeDistribution):
            raise ValueError(f"PairSampler.time must be a TimeDistribution, got {type(self.time).__name__}")
        if not self.shift > 0:
            raise ValueError(f"PairSampler.shift must be > 0, got {self.shift!r}")
        if not 0.0 <= self.fraction_r_neq_t <= 1.0:
            raise ValueError(f"fraction_r_neq_t must be in [0, 1], got {self.fraction_r_neq_t!r}")
        if self.layout not in ("random", "prefix"):
            raise ValueError(f"PairSampler.layout must be 'random' or 'prefix', got {self.layout!r}")

    def step_gap_rows(self, step_rows: int) -> int:
        """With layout="prefix": how many of an optimizer step's `step_rows` rows have r != t."""
        return round(self.fraction_r_neq_t * step_rows)

    def check_step_rows(self, step_rows: int) -> None:
        """Refuse a "prefix" step of `step_rows` rows whose r != t count misses the configured fraction
        entirely: no r != t row although the fraction is > 0, or no r = t row although it is < 1."""
        if self.layout != "prefix":
            return
        k = self.step_gap_rows(step_rows)
        if (k == 0 and self.fraction_r_neq_t > 0) or (k == step_rows and self.fraction_r_neq_t < 1):
            raise ValueError(
                f"fraction_r_neq_t={self.fraction_r_neq_t} of a step of {step_rows} rows gives {k} rows with "
                f"r != t: the layout 'prefix' cannot reach it (use more rows per step or the 'random' layout)")

    def num_gap_rows(self, n: int, part: BatchPart = WHOLE_BATCH) -> int | None:
        """With layout="prefix", how many leading rows of micro-batch `part` (n rows; every part of the step
        has n) have r != t; None for "random". Over the parts of a step the counts sum to `step_gap_rows`."""
        if self.layout != "prefix":
            return None
        self.check_step_rows(n * part.count)
        k = self.step_gap_rows(n * part.count)
        return k // part.count + (1 if part.index < k % part.count else 0)

    def sample(self, n: int, device: torch.device | str | None = None,
               part: BatchPart = WHOLE_BATCH) -> tuple[Tensor, Tensor]:
        """Returns (t, r), float32 [n] each, with r <= t; `part` places the micro-batch in its step ("prefix")."""
        a = self.time.sample(n, self.shift, device)
        b = self.time.sample(n, self.shift, device)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        if self.layout == "prefix":
            keep_gap = torch.arange(n, device=device) < self.num_gap_rows(n, part)
        else:
            keep_gap = torch.rand(n, device=device) < self.fraction_r_neq_t
        return t, torch.where(keep_gap, r, t)

    def expected_gap(self, method: Literal["quadrature", "monte_carlo"] = "quadrature",
                     num_samples: int = 1 << 22, seed: int = 0) -> float:
        """E[t - r] over the r != t rows, i.e. the mean |T1 - T2| of two iid shifted draws.

        "quadrature": the Gini mean difference E|T1 - T2| = 2 int_0^1 (2u - 1) Q(u) du with Q the shifted
        quantile, on 4096 Gauss-Legendre nodes (deterministic, ~1e-9 accurate). "monte_carlo": a
        fixed-seed estimate from `num_samples` draws (its own generator; the global RNG is untouched).
        """
        if method == "quadrature":
            u, w = _gauss_legendre_01(4096)
            return float(np.sum(w * 2.0 * (2.0 * u - 1.0) * self.time.quantile_numpy(u, self.shift)))
        if method == "monte_carlo":
            gen = torch.Generator().manual_seed(seed)
            draws = torch.rand(2, num_samples, generator=gen, dtype=torch.float64)
            t = self.time.quantile(draws, self.shift)
            return float((t[0] - t[1]).abs().mean())
        raise ValueError(f"unknown method {method!r}; choose 'quadrature' or 'monte_carlo'")

    def mean_over_r_equal_t_rows(self, fn: Callable[[np.ndarray], np.ndarray], num_nodes: int = 4096) -> float:
        """E[fn(t)] over the r = t rows, whose t is the max of two iid shifted draws: int_0^1 fn(Q(u)) 2u du.

        `fn` maps a float64 numpy array of times to values; used to normalise weights deterministically.
        """
        u, w = _gauss_legendre_01(num_nodes)
        return float(np.sum(w * 2.0 * u * fn(self.time.quantile_numpy(u, self.shift))))


__all__ = [
    "TimeDistribution",
    "PairSampler",
    "unsqueeze_like",
    "interpolate",
    "one_point_velocity",
    "time_shift",
    "dimension_shift",
    "SHIFT_BASE_DIM",
]
