"""Toy check of the flow math on a 2-D Gaussian mixture whose flow is known in closed form.

Data: x ~ sum_k pi_k N(m_k, s^2 I). On the path z_t = (1 - t) x + t e every component stays Gaussian,
z_t | k ~ N((1 - t) m_k, sigma_t^2 I) with sigma_t^2 = (1 - t)^2 s^2 + t^2, so the marginal velocity is

    v(z, t) = E[e - x | z_t = z] = sum_k gamma_k(z, t) [ (t - (1 - t) s^2) / sigma_t^2 (z - (1 - t) m_k) - m_k ],

gamma_k the posterior of component k. The oracle average velocity h(z, r, t) = (z - Phi_{t->r}(z)) / (t - r)
integrates dz/dtau = v with classical RK4 in float64. Labels: y = k selects component k (its own
Gaussian flow), y = K (the null class) the whole mixture; the toy trains unconditionally (y = K).

`mfrae toy --objective {fm,cmt,mfd,mft}` trains a small MLP with the library objectives on CPU, writes a
picture and prints metrics (relative error of u(z, 0, 1) against the oracle, energy distances).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from mfrae.fitting import fit
from mfrae.flow.objectives import CMTLoss, FlowMatchingLoss, MeanFlowLoss
from mfrae.flow.paths import TimeDistribution
from mfrae.flow.samplers import labelled_velocity_fn, meanflow_sample, ode_grid, solve_ode
from mfrae.layers import broadcast_time

OBJECTIVES: tuple[str, ...] = ("fm", "cmt", "mfd", "mft")
# CMT regresses onto fixed targets and converges sooner; its steps also cost more (15 teacher calls each).
DEFAULT_STEPS: dict[str, int] = {"fm": 6000, "cmt": 3000, "mfd": 6000, "mft": 6000}


#################################################################################
#                      Gaussian mixture with a closed-form flow                 #
#################################################################################


class GaussianMixture:
    """Gaussian mixture sum_k pi_k N(m_k, diag(s_k^2)) in D dims, with its exact flow.

    `std` is one number (every component isotropic with that std), one per component [K], or one per
    component and dimension [K, D]. On the path z_t = (1 - t) x + t e component k stays Gaussian with the
    per-dimension variance var_k(t) = (1 - t)^2 s_k^2 + t^2, so the velocity is closed-form for any stds.
    Callable as a velocity teacher: `mixture(z, t, y)` = v(z, t | y) (y = k: component k; y = K: all).
    """

    def __init__(self, means: Tensor, std: float | Tensor, weights: Tensor | None = None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() != 2:
            raise ValueError(f"means must be [K, D], got shape {tuple(means.shape)}")
        stds = torch.as_tensor(std, dtype=torch.float64)
        if stds.dim() == 1 and stds.shape[0] == means.shape[0]:
            stds = stds[:, None]
        if stds.dim() > 2 or not bool((stds > 0).all()):
            raise ValueError(f"std must be positive: one number, [K] or [K, D], got {std!r}")
        try:
            stds = stds.expand_as(means).clone()
        except RuntimeError:
            raise ValueError(f"std of shape {tuple(stds.shape)} does not fit means of shape {tuple(means.shape)}")
        if weights is None:
            weights = torch.ones(means.shape[0])
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (means.shape[0],) or bool((weights <= 0).any()):
            raise ValueError(f"weights must be {means.shape[0]} positive numbers, got {weights.tolist()}")
        self.means = means
        self.stds = stds  # [K, D]
        self.weights = weights / weights.sum()

    def to(self, dtype: torch.dtype) -> GaussianMixture:
        """The same mixture computing in `dtype`: float32 makes a fast training teacher; the oracle (flow,
        average_velocity) stays with the float64 default."""
        other = copy.copy(self)
        other.means, other.stds, other.weights = (p.to(dtype) for p in (self.means, self.stds, self.weights))
        return other

    @property
    def std(self) -> float:
        """The one std shared by every component and dimension (refused when they differ)."""
        if not bool((self.stds == self.stds[0, 0]).all()):
            raise ValueError("this mixture has per-component stds; read .stds [K, D]")
        return float(self.stds[0, 0])

    @classmethod
    def default(cls) -> GaussianMixture:
        """Six unequal modes on a ring of radius 1.5, std 0.4 (overall scale ~ unit variance)."""
        angles = torch.arange(6, dtype=torch.float64) * (2 * math.pi / 6) + 0.3
        means = 1.5 * torch.stack([angles.cos(), angles.sin()], dim=1)
        return cls(means, 0.4, torch.tensor([1.0, 2.0, 1.0, 3.0, 1.5, 2.0]))

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def null_class(self) -> int:
        return self.num_components

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n data points, float32 [n, D]."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return (self.means[k] + self.stds[k] * noise).float()

    def _component_logits(self, z: Tensor, t: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Per-component log pi_k N(z; (1 - t) m_k, diag var_k(t)) (up to the shared (2 pi)^(-D/2)), the diffs
        z - (1 - t) m_k [B, K, D] and the variances var_k(t) = (1 - t)^2 s_k^2 + t^2 [B, K, D]."""
        var = (1 - t)[:, None, None].square() * self.stds[None].square() + t[:, None, None].square()
        diff = z[:, None, :] - (1 - t)[:, None, None] * self.means[None]
        logits = self.weights.log()[None] - 0.5 * (diff.square() / var + var.log()).sum(-1)
        if y is not None:
            y = torch.as_tensor(y, device=z.device).long()
            own = torch.arange(self.num_components, device=z.device)[None] == y[:, None]
            logits = torch.where((y[:, None] == self.null_class) | own, logits, torch.full_like(logits, -math.inf))
        return logits, diff, var

    def velocity(self, z: Tensor, t: Tensor | float, y: Tensor | None = None) -> Tensor:
        """Closed-form marginal velocity E[e - x | z_t = z] (in the mixture's dtype, float64 unless `to`; returned
        in z's dtype):

            v = sum_k gamma_k(z, t) [ (t - (1 - t) s_k^2) / var_k(t) (z - (1 - t) m_k) - m_k ]

        (per dimension), gamma_k the posterior of component k given z_t = z.
        """
        z64 = z.to(self.means.dtype)
        t64 = broadcast_time(t, z64)
        logits, diff, var = self._component_logits(z64, t64, y)
        post = torch.softmax(logits, dim=1)  # [B, K]
        coef = (t64[:, None, None] - (1 - t64)[:, None, None] * self.stds[None].square()) / var
        v = (post[:, :, None] * (coef * diff)).sum(1) - post @ self.means
        return v.to(z.dtype)

    def __call__(self, z: Tensor, t: Tensor | float, y: Tensor | None = None, r: Tensor | None = None) -> Tensor:
        if r is not None:
            raise ValueError("the mixture is a velocity teacher; call it without r (use MixtureOracle for h)")
        return self.velocity(z, t, y)

    def log_prob(self, z: Tensor, t: Tensor | float) -> Tensor:
        """Exact log-density of z_t (float64), for checks of the velocity through the score."""
        z64 = z.double()
        t64 = broadcast_time(t, z64)
        logits, _, _ = self._component_logits(z64, t64, None)
        return torch.logsumexp(logits, dim=1) - 0.5 * self.dim * math.log(2 * math.pi)

    def flow(
        self, z: Tensor, t: Tensor | float, r: Tensor | float, y: Tensor | None = None, num_steps: int = 200
    ) -> Tensor:
        """Phi_{t -> r}(z): RK4 integration of dz/dtau = v(z, tau) from tau = t to tau = r (per row), float64."""
        z64 = z.double()
        t64, r64 = broadcast_time(t, z64), broadcast_time(r, z64)
        h = ((r64 - t64) / num_steps)[:, None]
        tau = t64
        for _ in range(num_steps):
            k1 = self.velocity(z64, tau, y)
            k2 = self.velocity(z64 + 0.5 * h * k1, tau + 0.5 * h[:, 0], y)
            k3 = self.velocity(z64 + 0.5 * h * k2, tau + 0.5 * h[:, 0], y)
            k4 = self.velocity(z64 + h * k3, tau + h[:, 0], y)
            z64 = z64 + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            tau = tau + h[:, 0]
        return z64.to(z.dtype)

    def average_velocity(self, z: Tensor, r: Tensor | float, t: Tensor | float, y: Tensor | None = None,
                         num_steps: int = 200) -> Tensor:
        """Oracle h(z, r, t) = (z - Phi_{t->r}(z)) / (t - r); equals v(z, t) where r = t."""
        z64 = z.double()
        t64, r64 = broadcast_time(t, z64), broadcast_time(r, z64)
        gap = (t64 - r64)[:, None]
        safe_gap = torch.where(gap > 0, gap, torch.ones_like(gap))
        h = (z64 - self.flow(z64, t64, r64, y, num_steps)) / safe_gap
        return torch.where(gap > 0, h, self.velocity(z64, t64, y)).to(z.dtype)


class MixtureOracle(nn.Module):
    """The exact average velocity as a MeanFlow 'network': oracle(z, t, y, r=None) = h(z, r, t | y)."""

    def __init__(self, mixture: GaussianMixture, num_steps: int = 200):
        super().__init__()
        self.mixture = mixture
        self.num_steps = num_steps

    @property
    def null_class(self) -> int:
        return self.mixture.null_class

    def forward(self, z: Tensor, t: Tensor | float, y: Tensor, r: Tensor | float | None = None) -> Tensor:
        return self.mixture.average_velocity(z, t if r is None else r, t, y, self.num_steps)


#################################################################################
#                                  Toy network                                  #
#################################################################################


class ToyMeanFlowNet(nn.Module):
    """MLP with the model convention net(x, t, y, r=None) on x [B, D].

    Input features: x, [t, sin(pi k t), cos(pi k t)]_{k=1..F}, the same of t - r (if interval_embedding),
    and a label embedding (num_classes + 1 rows, the last being the null class). Without
    interval_embedding it is a velocity model and rejects r, like the DiT^DH teacher.
    """

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 3, num_classes: int = 1,
                 num_frequencies: int = 1, interval_embedding: bool = True):
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 1 or num_frequencies < 0:
            raise ValueError(
                f"bad toy net sizes: dim={dim}, hidden={hidden}, depth={depth}, num_frequencies={num_frequencies}")
        self.dim = dim
        self.num_classes = num_classes
        self.interval_embedding = interval_embedding
        self.register_buffer("freqs", math.pi * torch.arange(1, num_frequencies + 1, dtype=torch.float32))
        time_features = 1 + 2 * num_frequencies
        label_dim = 16
        self.label_embedding = nn.Embedding(num_classes + 1, label_dim)
        in_dim = dim + time_features * (2 if interval_embedding else 1) + label_dim
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.mlp = nn.Sequential(*layers)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def _features(self, s: Tensor) -> Tensor:
        angles = s[:, None] * self.freqs[None]
        return torch.cat([s[:, None], angles.sin(), angles.cos()], dim=1)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor, r: Tensor | float | None = None) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"toy net expects x of shape [B, {self.dim}], got {tuple(x.shape)}")
        x = x.to(self.freqs.dtype)
        t = broadcast_time(t, x, "t")
        parts = [x, self._features(t)]
        if self.interval_embedding:
            r = t if r is None else broadcast_time(r, x, "r")
            parts.append(self._features(t - r))
        elif r is not None:
            raise ValueError("this toy net is a velocity model (interval_embedding=False); call it without r")
        parts.append(self.label_embedding(y))
        return self.mlp(torch.cat(parts, dim=1))


#################################################################################
#                                   Metrics                                     #
#################################################################################


def energy_distance(a: Tensor, b: Tensor) -> float:
    """Squared energy distance 2 E|A - B| - E|A - A'| - E|B - B'| (unbiased: self-pairs excluded).

    Zero iff the distributions agree; for two independent samples of one distribution it is ~0 +- noise.
    """
    a, b = a.double(), b.double()
    n, m = a.shape[0], b.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"energy distance needs at least 2 points per sample, got {n} and {m}")
    ab = torch.cdist(a, b).mean()
    aa = torch.cdist(a, a).sum() / (n * (n - 1))
    bb = torch.cdist(b, b).sum() / (m * (m - 1))
    return float(2 * ab - aa - bb)


#################################################################################
#                                   Training                                    #
#################################################################################


@dataclass
class ToyConfig:
    """Toy run settings. The defaults train MFD to mean_flow_error <= 0.10 in well under a minute on 2 CPU cores.

    Training times: logit-normal(time_mu, time_sigma), no shift (a 2-D 'latent'). The wide, low-centred
    logit-normal covers both ends of [0, 1]: the r = t rows (t = max of two draws) need small t too, and
    u(z, 0, 1) needs pairs near the corner (r, t) = (0, 1).
    """

    objective: str = "mfd"
    steps: int | None = None  # None: DEFAULT_STEPS[objective]
    batch_size: int = 256
    lr: float = 3e-3
    hidden: int = 128
    depth: int = 4
    num_frequencies: int = 1
    seed: int = 0
    time_mu: float = -1.0
    time_sigma: float = 1.5
    fraction_r_neq_t: float = 0.5
    derivative: str = "finite_difference"
    adaptive_p: float | None = None
    cmt_solver: str = "euler"
    cmt_trajectories: int = 64
    cmt_pairs_per_trajectory: int = 8
    ema_decay: float = 0.995
    eval_samples: int = 2000

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown toy objective {self.objective!r}; choose one of {OBJECTIVES}")
        if self.steps is None:
            self.steps = DEFAULT_STEPS[self.objective]
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError(
                f"steps must be >= 1 and batch_size >= 2, got steps={self.steps}, batch_size={self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if self.adaptive_p is None:
            # MFD: the paper's p = 1. MFT: p = 0. The adaptive weight 1 / sg(L + c) turns regression onto a
            # noisy target (e - x) into a residual-weighted one whose minimiser is not the conditional mean;
            # in 2-D, where L fluctuates strongly between samples, that bias is large (ImageNet latents sum
            # L over ~2e5 elements, so it is mild there). With the exact teacher the target has no noise.
            self.adaptive_p = 0.0 if self.objective == "mft" else 1.0


def build_objective(cfg: ToyConfig, mixture: GaussianMixture):
    """The library objective for the toy: no shift, no label dropout (the toy is unconditional)."""
    time_dist = TimeDistribution.logit_normal(cfg.time_mu, cfg.time_sigma)
    null = mixture.null_class
    if cfg.objective == "fm":
        return FlowMatchingLoss(time=time_dist, label_dropout=0.0, null_class=null)
    if cfg.objective == "cmt":
        # t_end = 0: the closed-form teacher is fine at t = 0, so the trajectories end on data.
        return CMTLoss(mixture, grid_points=16, t_end=0.0, solver=cfg.cmt_solver,
                       pairs_per_trajectory=cfg.cmt_pairs_per_trajectory, label_dropout=0.0, null_class=null)
    teacher = mixture if cfg.objective == "mfd" else None
    return MeanFlowLoss(teacher, time=time_dist, fraction_r_neq_t=cfg.fraction_r_neq_t, derivative=cfg.derivative,
                        adaptive_p=cfg.adaptive_p, label_dropout=0.0, null_class=null)


def build_net(cfg: ToyConfig, mixture: GaussianMixture) -> ToyMeanFlowNet:
    return ToyMeanFlowNet(mixture.dim, cfg.hidden, cfg.depth, num_classes=mixture.num_components,
                          num_frequencies=cfg.num_frequencies, interval_embedding=cfg.objective != "fm")


def train_toy(cfg: ToyConfig, mixture: GaussianMixture | None = None) -> tuple[ToyMeanFlowNet, list[float]]:
    """Adam with a cosine decay to 5% of lr (`mfrae.fitting.fit`), fresh mixture samples every step. Returns
    the EMA of the weights (eval mode, requires_grad off) and the per-step mean losses."""
    mixture = GaussianMixture.default() if mixture is None else mixture
    torch.manual_seed(cfg.seed)
    net = build_net(cfg, mixture)
    objective = build_objective(cfg, mixture)
    # CMT: each data row stands for one teacher trajectory, cut into cmt_pairs_per_trajectory pairs.
    batch = cfg.cmt_trajectories if cfg.objective == "cmt" else cfg.batch_size
    labels = torch.full((batch,), mixture.null_class, dtype=torch.long)
    ema = copy.deepcopy(net).requires_grad_(False)
    params, ema_params = list(net.parameters()), list(ema.parameters())

    @torch.no_grad()
    def update_ema(step: int) -> None:  # EMA with a warm-up, so early weights do not linger
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        for p_ema, p in zip(ema_params, params):
            p_ema.lerp_(p, 1 - decay)

    net.train()
    losses = fit(params, lambda step: objective(net, mixture.sample(batch), labels, step).mean(), steps=cfg.steps,
                 lr=cfg.lr, final_lr_fraction=0.05, after_step=update_ema)
    return ema.eval(), losses


class _EulerJumps(nn.Module):
    """A velocity net used as a MeanFlow sampler: u(z, r, t) := v(z, t) (one Euler step per jump)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, z: Tensor, t: Tensor, y: Tensor, r: Tensor | None = None) -> Tensor:
        return self.net(z, t, y)


@torch.no_grad()
def evaluate_toy(net: nn.Module, mixture: GaussianMixture, num_samples: int = 2000, seed: int = 1234) -> dict:
    """Metrics on fresh noise (a fixed evaluation seed, independent of training):

    mean_flow_error       ||u(e, 0, 1) - h(e, 0, 1)|| / ||h(e, 0, 1)|| over the batch (Frobenius)
    energy_distance_*     energy distance of 1-step / 2-step / 50-point Euler ODE samples (using
                          u(z, t, t)) to fresh data; _floor: between two independent data samples.
    """
    gen = torch.Generator().manual_seed(seed)
    student = net if getattr(net, "interval_embedding", True) else _EulerJumps(net)
    noise = torch.randn(num_samples, mixture.dim, generator=gen)
    labels = torch.full((num_samples,), mixture.null_class, dtype=torch.long)
    h = mixture.average_velocity(noise, 0.0, 1.0, labels)
    u = student(noise, torch.ones(num_samples), labels, r=torch.zeros(num_samples))
    data_a, data_b = mixture.sample(num_samples, gen), mixture.sample(num_samples, gen)
    one_step = meanflow_sample(student, noise, labels, 1)
    two_step = meanflow_sample(student, noise, labels, 2)
    ode = solve_ode(labelled_velocity_fn(net, labels), noise, ode_grid(50, 1.0, 0.0), "euler")
    return {
        "mean_flow_error": float((u - h).norm() / h.norm()),
        "energy_distance_1step": energy_distance(one_step, data_a),
        "energy_distance_2step": energy_distance(two_step, data_a),
        "energy_distance_ode50": energy_distance(ode, data_a),
        "energy_distance_floor": energy_distance(data_b, data_a),
    }


@torch.no_grad()
def teacher_map_error(
    mixture: GaussianMixture, solver: str = "euler", num_samples: int = 2000, seed: int = 1234
) -> float:
    """Relative error of the CMT teacher's own one-step map (16-point solver) against the oracle h(e, 0, 1):
    the floor that CMT's mean_flow_error converges to."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(num_samples, mixture.dim, generator=gen)
    labels = torch.full((num_samples,), mixture.null_class, dtype=torch.long)
    h = mixture.average_velocity(noise, 0.0, 1.0, labels)
    end = solve_ode(labelled_velocity_fn(mixture, labels), noise, ode_grid(16, 1.0, 0.0), solver)
    return float(((noise - end) - h).norm() / h.norm())


#################################################################################
#                                   Picture                                     #
#################################################################################


def draw_picture(net: nn.Module, mixture: GaussianMixture, path: Path, num_points: int = 1500, seed: int = 7) -> None:
    """Three panels (Pillow): data + 1-step samples, data + 2-step samples, exact ODE trajectories (grey)
    with the learned 2-step jumps (orange) from the same noise."""
    from PIL import Image, ImageDraw

    gen = torch.Generator().manual_seed(seed)
    student = net if getattr(net, "interval_embedding", True) else _EulerJumps(net)
    noise = torch.randn(num_points, mixture.dim, generator=gen)
    labels = torch.full((num_points,), mixture.null_class, dtype=torch.long)
    data = mixture.sample(num_points, gen)
    with torch.no_grad():
        one_step = meanflow_sample(student, noise, labels, 1)
        _, jumps = meanflow_sample(student, noise[:16], labels[:16], 2, return_trajectory=True)
    grid = ode_grid(41, 1.0, 0.0)
    paths = [noise[:16]]
    for t_cur, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        paths.append(mixture.flow(paths[-1], t_cur, t_next, num_steps=4))
    paths = torch.stack(paths)  # [41, 16, 2]

    size, lim = 360, 3.5
    image = Image.new("RGB", (3 * size, size + 24), "white")
    draw = ImageDraw.Draw(image)

    def px(points: Tensor, panel: int) -> list[tuple[float, float]]:
        p = points[:, :2].double()
        xs = (p[:, 0] + lim) / (2 * lim) * (size - 1) + panel * size
        ys = (lim - p[:, 1]) / (2 * lim) * (size - 1) + 24
        return list(zip(xs.tolist(), ys.tolist()))

    def dots(points: Tensor, panel: int, colour: str, radius: float = 1.2) -> None:
        for x, y in px(points, panel):
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)

    with torch.no_grad():
        two_step = meanflow_sample(student, noise, labels, 2)
    for panel, (samples, title) in enumerate([(one_step, "data (grey) / 1-step (red)"),
                                              (two_step, "data (grey) / 2-step (blue)")]):
        dots(data, panel, "#b0b0b0")
        dots(samples, panel, "#d62728" if panel == 0 else "#1f77b4")
        draw.text((panel * size + 6, 6), title, fill="black")
    dots(data, 2, "#dddddd")
    for k in range(paths.shape[1]):
        draw.line(px(paths[:, k], 2), fill="#606060", width=1)
        draw.line(px(jumps[:, k], 2), fill="#ff7f0e", width=2)
        dots(jumps[-1, k : k + 1], 2, "#ff7f0e", 2.5)
    draw.text((2 * size + 6, 6), "exact ODE paths / learned 2-step jumps", fill="black")
    for panel in (1, 2):
        draw.line([(panel * size, 24), (panel * size, size + 24)], fill="#cccccc")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


#################################################################################
#                                      CLI                                      #
#################################################################################


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ToyConfig()
    parser.add_argument("--objective", choices=OBJECTIVES, default=defaults.objective,
                        help="fm: flow matching; cmt: consistency mid-training from the exact teacher; "
                             "mfd: MeanFlow distillation from the exact velocity; mft: MeanFlow from e - x")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps (default per objective: {DEFAULT_STEPS})")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--derivative", choices=("finite_difference", "jvp"), default=defaults.derivative,
                        help="how MFD / MFT compute du/dt")
    parser.add_argument("--cmt-solver", choices=("euler", "heun"), default=defaults.cmt_solver,
                        help="teacher solver for CMT trajectories (16 grid points)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest for this tiny MLP, and robust on a busy machine)")
    parser.add_argument("--out", type=Path, default=Path("toy_out"), help="folder for the picture")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")


def run(args: argparse.Namespace) -> int:
    cfg = ToyConfig(objective=args.objective, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                    seed=args.seed, derivative=args.derivative, cmt_solver=args.cmt_solver)
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    mixture = GaussianMixture.default()
    start = time.perf_counter()
    net, losses = train_toy(cfg, mixture)
    train_seconds = time.perf_counter() - start
    metrics = evaluate_toy(net, mixture, cfg.eval_samples)
    if cfg.objective == "cmt":
        metrics["teacher_map_error"] = teacher_map_error(mixture, cfg.cmt_solver, cfg.eval_samples)
    picture = Path(args.out) / f"toy_{cfg.objective}.png"
    draw_picture(net, mixture, picture)
    result = {
        "objective": cfg.objective,
        **metrics,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "train_seconds": round(train_seconds, 2),
        "seconds": round(time.perf_counter() - start, 2),
        "picture": str(picture),
        "config": asdict(cfg),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            if key != "config":
                print(f"{key:>24}: {value:.4f}" if isinstance(value, float) else f"{key:>24}: {value}")
    return 0


__all__ = [
    "GaussianMixture",
    "MixtureOracle",
    "ToyMeanFlowNet",
    "ToyConfig",
    "energy_distance",
    "build_objective",
    "train_toy",
    "evaluate_toy",
    "teacher_map_error",
    "draw_picture",
    "add_arguments",
    "run",
]
