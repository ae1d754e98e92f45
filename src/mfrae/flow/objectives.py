"""Training objectives: flow matching (the teacher), CMT (consistency mid-training) and MeanFlow (MFD / MFT and
everything between, optionally weighted by the improved training scheme of arXiv 2511.19065).

Every objective is a small callable with one interface (EDM style):

    loss = objective(net, x, y, step, part)   # per-sample losses, shape [B] ([P] pairs for CMT)
    loss.mean().backward()

(`part`, default the whole batch: which micro-batch of the optimizer step (x, y) is; only MeanFlow's
"prefix" row layout reads it.)

`net` is the model being trained: a velocity model `net(z, t, y)` for flow matching, an average-velocity
model `net(z, t, y, r=r)` otherwise (r omitted means r = t). Frozen models (the teacher) are attributes of
the objective, set at construction and always called under no_grad in eval mode; a teacher may also be a
plain function `teacher(z, t, y) -> v` (the toy's closed-form velocity). All randomness comes from
torch's global RNG. Labels are dropped to `null_class` (given at construction) once per sample: every
network call made for a sample (prediction, stencil, teacher, guidance) sees the same label.

Papers: MeanFlow (arXiv 2505.13447), MF-RAE (arXiv 2511.13019), CMT (arXiv 2509.24526), the improved
MeanFlow training (arXiv 2511.19065). Equation numbers are those of the arXiv versions; where the official
code differs from the papers, docs/meanflow.md says what we do and why.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from mfrae.distributed import WHOLE_BATCH, BatchPart, plain_module
from mfrae.flow.paths import PairSampler, TimeDistribution, interpolate, one_point_velocity, unsqueeze_like
from mfrae.flow.samplers import ODE_METHODS, ode_grid, solve_ode
from mfrae.layers import strict_float32_region

Model = Callable[..., Tensor]

Derivative = Literal["finite_difference", "jvp", "finite_difference_fused"]
DERIVATIVES: tuple[str, ...] = ("finite_difference", "jvp", "finite_difference_fused")
REDUCTIONS: tuple[str, ...] = ("mean", "sum")


#################################################################################
#                                   Helpers                                     #
#################################################################################


def drop_labels(y: Tensor, prob: float, null_class: int | None) -> Tensor:
    """Replace each label by `null_class` independently with probability `prob` (one draw per sample)."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"label dropout probability must be in [0, 1], got {prob!r}")
    if prob == 0.0:
        return y
    drop = torch.rand(y.shape[0], device=y.device) < prob
    return torch.where(drop, torch.full_like(y, null_class), y)


def per_sample(sq_error: Tensor, reduction: str) -> Tensor:
    """Reduce an elementwise squared error [B, ...] to per-sample values [B] by sum or mean over the rest."""
    if reduction == "sum":
        return sq_error.flatten(1).sum(1)
    if reduction == "mean":
        return sq_error.flatten(1).mean(1)
    raise ValueError(f"unknown reduction {reduction!r}; choose one of {REDUCTIONS}")


def adaptive_weighting(sq_error: Tensor, p: float = 1.0, c: float = 1e-2, squared: bool = False) -> Tensor:
    """MeanFlow's adaptive loss on per-sample squared errors L (arXiv 2505.13447 Sec. 4.3, "Loss metrics"):

        default:        L / sg(L + c)^p               (gradient ~ grad L / L for p = 1)
        squared=True:   L^2 / (sg(L)^2 + c)^p          (the released MF-RAE code; c = 1e-3 for parity,
                                                        docs/meanflow.md, "Squared adaptive weight")

    p = 0 returns L unchanged.
    """
    if p < 0 or c < 0:
        raise ValueError(f"adaptive weighting needs p >= 0 and c >= 0, got p={p!r}, c={c!r}")
    if p == 0:
        return sq_error
    if squared:
        return sq_error.square() / (sq_error.detach().square() + c).pow(p)
    return sq_error / (sq_error.detach() + c).pow(p)


def _check_batch(x: Tensor, y: Tensor) -> None:
    if x.dim() < 2:
        raise ValueError(f"x must be a batch [B, ...] with at least 2 dims, got shape {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape [{x.shape[0]}], got {tuple(y.shape)}")


def _check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {REDUCTIONS}")
    return reduction


def _check_label_dropout(label_dropout: float) -> float:
    if not 0.0 <= label_dropout <= 1.0:
        raise ValueError(f"label_dropout must be in [0, 1], got {label_dropout!r}")
    return float(label_dropout)


def _check_null_class(null_class: int | None, needed_for: str | None) -> int | None:
    """The null label ("no class"; num_classes for DiT^DH); required when `needed_for` names a use of it."""
    if null_class is None:
        if needed_for:
            raise ValueError(f"{needed_for} replaces labels by the null class: pass null_class "
                             "(the model's 'no class' label, num_classes for DiT^DH)")
        return None
    if isinstance(null_class, bool) or not isinstance(null_class, int) or null_class < 0:
        raise ValueError(f"null_class must be a non-negative integer, got {null_class!r}")
    return null_class


@contextlib.contextmanager
def _eval_mode(module: Model) -> Iterator[None]:
    """Temporarily put an nn.Module in eval mode (no-op for plain functions)."""
    if not isinstance(module, nn.Module) or not module.training:
        yield
        return
    module.eval()
    try:
        yield
    finally:
        module.train()


def _frozen(model: Model | None) -> Model | None:
    if isinstance(model, nn.Module):
        model.eval()
    return model


def _call_frozen(model: Model, *args, **kwargs) -> Tensor:
    """Frozen-model call: no autograd, eval mode."""
    with torch.no_grad(), _eval_mode(model):
        return model(*args, **kwargs)


def _math_attention():
    """JVP needs forward-mode AD, which the fused SDPA kernels (CPU flash, CUDA flash / mem-efficient)
    do not implement; the math backend is plain differentiable ops."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


#################################################################################
#                          The MeanFlow target                                  #
#################################################################################


def mixed_velocity(one_point: Tensor, v_teacher: Tensor | None, teacher_mix: float) -> Tensor:
    """The velocity the MeanFlow target is built on (MF-RAE arXiv 2511.13019, Prop. 3.1):

        w_lambda = (1 - lambda) (e - x) + lambda v_teacher(z_t, t, y),     lambda = `teacher_mix` in [0, 1]

    lambda = 1 is distillation from a flow-matching teacher (MFD), lambda = 0 the one-point velocity e - x of
    plain MeanFlow / MF-RAE's bootstrapping stage (MFT); `v_teacher` may be None then. The end points are
    returned as they are, without arithmetic.
    """
    if teacher_mix == 0.0:
        return one_point
    if teacher_mix == 1.0:
        return v_teacher
    return (1.0 - teacher_mix) * one_point + teacher_mix * v_teacher


def meanflow_target(w: Tensor, dudt: Tensor, t: Tensor, r: Tensor) -> Tensor:
    """u_tgt = sg(w - (t - r) du/dt): the MeanFlow identity u = v - (t - r) du/dt (arXiv 2505.13447 Eq. 6)
    turned into a regression target (Eq. 10; Eq. 11 with the one-point velocity, Eq. 18 with guidance).

    w [B, ...] is the velocity (v, w_lambda or the guided v_tilde), du/dt [B, ...] the total derivative of the
    prediction along (dz, dr, dt) = (w, 0, 1) (Eq. 8), t and r [B]; sg is the stop-gradient. The gap t - r is
    taken in du/dt's dtype. The true average velocity is the fixed point of this target when w is the
    true marginal velocity.
    """
    return (w - unsqueeze_like(t - r, dudt) * dudt).detach()


#################################################################################
#                         The total time derivative                             #
#################################################################################


def finite_difference_derivative(
    net: Model, z: Tensor, t: Tensor, r: Tensor, y: Tensor, direction: Tensor, step: float = 5e-3
) -> Tensor:
    """Central difference of u along (dz, dt, dr) = (direction, 1, 0), without autograd (MF-RAE's replacement
    of MeanFlow's JVP, arXiv 2511.13019; step 5e-3 as there):

        du/dt ~ [u(z + d v, r, t + d) - u(z - d v, r, t - d)] / (2 d),   d = step.

    Both perturbed evaluations run as one no-grad batch, so they store no activations. Times are not
    clamped (t + d may exceed 1), as in the official code. The stencil always runs in float32, whatever
    the caller's autocast, and without TF32 on CUDA (`strict_float32_region`): in bf16 the difference of two
    outputs 1e-2 apart is mostly rounding (20-40 % error on du/dt, docs/benchmarks.md), in TF32 ~1e-2.
    """
    if not step > 0:
        raise ValueError(f"finite-difference step must be > 0, got {step!r}")
    n = z.shape[0]
    z, direction = z.float(), direction.float()
    with torch.no_grad(), strict_float32_region(z.device):
        dz = step * direction
        u_pm = net(torch.cat([z + dz, z - dz]), torch.cat([t + step, t - step]), torch.cat([y, y]),
                   r=torch.cat([r, r])).float()
        u_plus, u_minus = u_pm[:n], u_pm[n:]
        return (u_plus - u_minus) / (2 * step)


def jvp_with_primal(net: Model, z: Tensor, t: Tensor, r: Tensor, y: Tensor, direction: Tensor) -> tuple[Tensor, Tensor]:
    """(u, du/dt) by forward-mode AD (MeanFlow arXiv 2505.13447 Eq. 8, Alg. 1): torch.func.jvp of
    (z, t, r) -> u(z, r, t) with tangent (direction, 1, 0).

    u keeps its autograd graph (it is the prediction the loss trains); du/dt is returned detached. The
    math attention backend is used inside the JVP (see `_math_attention`).
    """

    def u_fn(z_: Tensor, t_: Tensor, r_: Tensor) -> Tensor:
        return net(z_, t_, y, r=r_)

    tangents = (direction.to(z.dtype), torch.ones_like(t), torch.zeros_like(r))
    with _math_attention():
        u, dudt = torch.func.jvp(u_fn, (z, t, r), tangents)
    return u, dudt.detach()


@dataclass(frozen=True)
class GapRows:
    """The rows of a batch whose pair has r != t: the only rows whose target needs du/dt.

    `index` selects them. With the pair sampler's "prefix" layout it is a static slice (no host-device sync,
    a fixed shape for torch.compile); with the "random" layout the indices are found in the data (`nonzero`,
    one host sync on GPU). An empty or a full selection is a slice either way.
    """

    index: slice | Tensor
    count: int

    @classmethod
    def leading(cls, count: int) -> GapRows:
        """The first `count` rows."""
        return cls(slice(0, count), count)

    @classmethod
    def find(cls, t: Tensor, r: Tensor) -> GapRows:
        """The rows with r != t, wherever they are."""
        index = (r != t).nonzero().squeeze(1)
        count = index.numel()
        return cls.leading(count) if count in (0, t.shape[0]) else cls(index, count)

    def take(self, *tensors: Tensor) -> list[Tensor]:
        return [x[self.index] for x in tensors]


class TimeDerivative:
    """How a MeanFlow objective gets its prediction and du/dt; one subclass per method. The interface:

        u, dudt = derivative(net, z, t, r, y, w, rows)

    u = u_theta(z, r, t | y) on every row, with its autograd graph (the prediction the loss trains); dudt the
    total derivative along (dz, dr, dt) = (w, 0, 1) (MeanFlow Eq. 8) on the r != t `rows` only, detached
    (None when there are none). The r = t rows need no derivative: its coefficient t - r is zero.
    """

    def __call__(self, net: Model, z: Tensor, t: Tensor, r: Tensor, y: Tensor, w: Tensor,
                 rows: GapRows) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError


def _check_step(step: float) -> None:
    if not step > 0:
        raise ValueError(f"fd_step must be > 0, got {step!r}")


@dataclass(frozen=True)
class FiniteDifference(TimeDerivative):
    """MF-RAE's method (the default): one autograd forward of the whole batch, then the central difference
    (`finite_difference_derivative`) on the r != t rows as one no-grad forward of twice those rows."""

    step: float = 5e-3

    def __post_init__(self):
        _check_step(self.step)

    def __call__(self, net, z, t, r, y, w, rows):
        u = net(z, t, y, r=r)
        return u, (finite_difference_derivative(net, *rows.take(z, t, r, y, w), self.step) if rows.count else None)


@dataclass(frozen=True)
class JVP(TimeDerivative):
    """MeanFlow's method: exact forward-mode AD (`jvp_with_primal`) for du/dt on the r != t rows, and one
    autograd forward of the whole batch for the prediction.

    The JVP runs without autograd on the network inside its DDP / torch.compile wrappers (`plain_module`):
    torch.func.jvp does not go through DistributedDataParallel, and DDP must see exactly one autograd forward
    per backward, the prediction's, whose gradients it then reduces. Its primal (the prediction of the r != t
    rows, again) is dropped; the cost is that one extra no-grad forward of those rows, and no autograd graph
    of the tangent computation is kept."""

    def __call__(self, net, z, t, r, y, w, rows):
        u = net(z, t, y, r=r)
        dudt = None
        if rows.count:
            with torch.no_grad():
                _, dudt = jvp_with_primal(plain_module(net), *rows.take(z, t, r, y, w))
        return u, dudt


@dataclass(frozen=True)
class FusedFiniteDifference(TimeDerivative):
    """The layout of the released MF-RAE code: one autograd forward of the 3B batch [z, z + d w, z - d w] at
    times [t, t + d, t - d] (r unchanged) in the caller's precision, du/dt = (u+ - u-) / (2 d). The numbers of
    `FiniteDifference` up to rounding, at more time and memory (gradients flow back through the whole 3B
    graph); kept for benchmarks. du/dt is returned in the velocity's precision when that is wider, so the
    target is formed in it, as there."""

    step: float = 5e-3

    def __post_init__(self):
        _check_step(self.step)

    def __call__(self, net, z, t, r, y, w, rows):
        d = self.step
        u_all = net(torch.cat([z, z + d * w, z - d * w]), torch.cat([t, t + d, t - d]), torch.cat([y, y, y]),
                    r=torch.cat([r, r, r]))
        u, u_plus, u_minus = u_all.chunk(3)
        dudt = ((u_plus - u_minus) / (2 * d)).detach()
        return u, (rows.take(dudt.to(torch.promote_types(dudt.dtype, w.dtype)))[0] if rows.count else None)


def make_time_derivative(method: Derivative, fd_step: float = 5e-3) -> TimeDerivative:
    """The TimeDerivative named `method` (one of DERIVATIVES)."""
    if method == "finite_difference":
        return FiniteDifference(fd_step)
    if method == "finite_difference_fused":
        return FusedFiniteDifference(fd_step)
    if method == "jvp":
        return JVP()
    raise ValueError(f"unknown derivative {method!r}; choose one of {DERIVATIVES}")


#################################################################################
#                               Flow matching                                   #
#################################################################################


class FlowMatchingLoss:
    """Flow matching, the teacher objective (regression onto the one-point velocity, L_CFM of MeanFlow
    arXiv 2505.13447 Sec. 3; on RAE latents as RAE, arXiv 2510.11690):

        L_FM = E_{t, x, e} (1/D) || v_theta(z_t, t, y) - (e - x) ||^2,   z_t = (1 - t) x + t e,
        t = shift_a(t0), t0 ~ `time`.

    The minimiser is the marginal velocity v(z, t) = E[e - x | z_t = z]. Labels are dropped to `null_class`
    with probability `label_dropout` (null_class is required when label_dropout > 0). Returns per-sample
    losses [B]: mean over the D latent elements (as the RAE code), or the sum with reduction="sum".
    """

    def __init__(
        self,
        *,
        time: TimeDistribution = TimeDistribution.logit_normal(0.0, 1.0, 0.0, 0.999),
        shift: float = 1.0,
        label_dropout: float = 0.1,
        null_class: int | None = None,
        reduction: Literal["mean", "sum"] = "mean",
    ):
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift!r}")
        self.time = time
        self.shift = float(shift)
        self.label_dropout = _check_label_dropout(label_dropout)
        self.reduction = _check_reduction(reduction)
        self.null_class = _check_null_class(null_class, "label dropout" if label_dropout > 0 else None)

    def __call__(self, net: Model, x: Tensor, y: Tensor, step: int = 0, part: BatchPart = WHOLE_BATCH) -> Tensor:
        _check_batch(x, y)
        y = drop_labels(y, self.label_dropout, self.null_class)
        t = self.time.sample(x.shape[0], self.shift, x.device)
        noise = torch.randn_like(x)
        v_pred = net(interpolate(x, noise, t), t, y)
        return per_sample((v_pred - one_point_velocity(x, noise)).square(), self.reduction)


#################################################################################
#                       CMT: consistency mid-training                           #
#################################################################################


@dataclass
class TrajectoryPairs:
    """Training pairs cut from solver trajectories: predict u(z, r, t) ~ target."""

    z: Tensor  # [P, ...] state at time t
    t: Tensor  # [P] float32
    r: Tensor  # [P] float32, r < t
    y: Tensor  # [P]
    target: Tensor  # [P, ...] (z_t - z_r) / (t - r)


def trajectory_pairs(states: Tensor, times: Tensor, y: Tensor, num_pairs: int) -> TrajectoryPairs:
    """Draw `num_pairs` pairs uniformly, with replacement, from all (trajectory b, i < j) with
    states [K, B, ...] at strictly decreasing `times` [K]:

        z = states[i, b],   t = times[i],   r = times[j],   target = (states[i, b] - states[j, b]) / (t - r).

    (K (K - 1) / 2 pairs per trajectory, 120 for K = 16.)
    """
    times = torch.as_tensor(times, dtype=torch.float64)
    if states.dim() < 3 or times.shape != (states.shape[0],):
        raise ValueError(
            f"states must be [K, B, ...] with times [K]; got {tuple(states.shape)} and {tuple(times.shape)}")
    if not bool(torch.all(times[1:] < times[:-1])):
        raise ValueError(f"trajectory times must be strictly decreasing, got {times.tolist()}")
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs!r}")
    K, B = states.shape[0], states.shape[1]
    if y.shape != (B,):
        raise ValueError(f"labels must have shape [{B}], got {tuple(y.shape)}")
    src, dst = torch.triu_indices(K, K, offset=1, device=states.device)  # src < dst: src is the noisier state
    pool = torch.randint(0, B * src.numel(), (num_pairs,), device=states.device)
    b, k = pool // src.numel(), pool % src.numel()
    i, j = src[k], dst[k]
    times = times.to(states.device)
    t64, r64 = times[i], times[j]
    z_i, z_j = states[i, b], states[j, b]
    target = (z_i - z_j) / unsqueeze_like((t64 - r64).to(states.dtype), z_i)
    return TrajectoryPairs(z=z_i, t=t64.float(), r=r64.float(), y=y[b], target=target)


class CMTLoss:
    """Consistency mid-training for flow maps (the flow-map loss of CMT, arXiv 2509.24526, as MF-RAE uses it
    between the teacher and MFD):

        L = E_{i < j} E_{e} || u_theta(z_i, r = t_j, t = t_i) - (z_i - z_j) / (t_i - t_j) ||^2

    where z_0 = e ~ N(0, I), z_1, ..., z_{K-1} is the frozen teacher's solver trajectory on the grid
    t_k = shift_a(1 - (1 - t_end) k / (K - 1)) (K = `grid_points` = 16 states, i.e. 15 Euler teacher
    calls, as the official "16-step" Euler config). Data x is used only for its shape and labels.
    Each step draws `pairs_per_trajectory` x B pairs uniformly with replacement from all
    B K (K - 1) / 2 pairs. Per-pair loss: mean (default, official) or sum of squares; no adaptive weight.

    time_labels="shifted" (default) labels each state with its real (shifted) time, the coordinates
    MFD / MFT train on. time_labels="nominal" reproduces the released code: state k is labelled
    1 - k / (K - 1) and the target divided by that nominal gap (docs/meanflow.md, "CMT time labels").
    Labels are dropped to `null_class` (required when label_dropout > 0) before the teacher runs.
    """

    def __init__(
        self,
        teacher: Model,
        *,
        grid_points: int = 16,
        shift: float = 1.0,
        t_end: float = 0.001,
        solver: Literal["euler", "heun"] = "euler",
        pairs_per_trajectory: int = 64,
        time_labels: Literal["shifted", "nominal"] = "shifted",
        label_dropout: float = 0.1,
        null_class: int | None = None,
        reduction: Literal["mean", "sum"] = "mean",
    ):
        if teacher is None:
            raise ValueError("CMT needs a frozen velocity teacher")
        if grid_points < 2:
            raise ValueError(f"grid_points must be >= 2, got {grid_points!r}")
        if solver not in ODE_METHODS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {ODE_METHODS}")
        if pairs_per_trajectory < 1:
            raise ValueError(f"pairs_per_trajectory must be >= 1, got {pairs_per_trajectory!r}")
        if time_labels not in ("shifted", "nominal"):
            raise ValueError(f"time_labels must be 'shifted' or 'nominal', got {time_labels!r}")
        self.teacher = _frozen(teacher)
        self.grid = ode_grid(grid_points, shift, t_end)
        nominal = torch.linspace(1.0, 0.0, grid_points, dtype=torch.float64)
        self.label_times = self.grid if time_labels == "shifted" else nominal
        self.solver = solver
        self.pairs_per_trajectory = int(pairs_per_trajectory)
        self.time_labels = time_labels
        self.label_dropout = _check_label_dropout(label_dropout)
        self.reduction = _check_reduction(reduction)
        self.null_class = _check_null_class(null_class, "label dropout" if label_dropout > 0 else None)

    def trajectory(self, noise: Tensor, y: Tensor) -> Tensor:
        """Teacher solver states [K, B, ...] on `self.grid`, starting from `noise` at t = 1."""
        _, states = solve_ode(lambda z, t: _call_frozen(self.teacher, z, t, y), noise, self.grid, self.solver,
                              return_trajectory=True)
        return states

    def pairs(self, x: Tensor, y: Tensor) -> TrajectoryPairs:
        """Label dropout, fresh noise, teacher trajectories and the drawn training pairs for one step."""
        _check_batch(x, y)
        y = drop_labels(y, self.label_dropout, self.null_class)
        states = self.trajectory(torch.randn_like(x), y)
        return trajectory_pairs(states, self.label_times, y, self.pairs_per_trajectory * x.shape[0])

    def __call__(self, net: Model, x: Tensor, y: Tensor, step: int = 0, part: BatchPart = WHOLE_BATCH) -> Tensor:
        p = self.pairs(x, y)
        u = net(p.z, p.t, p.y, r=p.r)
        return per_sample((u - p.target).square(), self.reduction)


#################################################################################
#                                   MeanFlow                                    #
#################################################################################


@dataclass(frozen=True)
class TrainingGuidance:
    """Classifier-free guidance baked into the MeanFlow target (MeanFlow arXiv 2505.13447 Sec. 4.2, Eq. 19;
    the kappa term: its App. B.1). For t in [t_min, t_max] and rows that keep their label:

        v_tilde = omega w + kappa u(z_t, t, t | y) + (1 - omega - kappa) u(z_t, t, t | null),

    elsewhere v_tilde = w. The effective CFG scale is omega / (1 - kappa). The two extra calls run without
    grad in eval mode, on the student itself (source="student", the MeanFlow recipe) or on the frozen
    teacher (source="teacher", guidance distilled from the teacher).
    """

    omega: float = 1.0
    kappa: float = 0.0
    t_min: float = 0.0
    t_max: float = 1.0
    source: Literal["student", "teacher"] = "student"

    def __post_init__(self):
        if not self.t_min <= self.t_max:
            raise ValueError(f"guidance interval must satisfy t_min <= t_max, got [{self.t_min}, {self.t_max}]")
        if not 0.0 <= self.kappa < 1.0:
            raise ValueError(f"guidance kappa must be in [0, 1), got {self.kappa!r}")
        if self.source not in ("student", "teacher"):
            raise ValueError(f"guidance source must be 'student' or 'teacher', got {self.source!r}")


@dataclass(frozen=True)
class ImprovedSchedule:
    """The weights of the improved MeanFlow training (arXiv 2511.19065 App. B, Eq. 8), applied after the
    adaptive normalisation (its Eq. 7; the order matters, docs/meanflow.md, "The improved training scheme"):

        r != t rows:  beta(dt, s) = (1 - s) + lambda s (1 - dt),   dt = t - r,   s = 1 - (step / total_steps)^k
        r  = t rows:  alpha(t)

    lambda = 1 / E[1 - dt] over the configured pair distribution (computed by `beta_scale_method`, not
    configured; `MeanFlowLoss.beta_scale`), so the mean of beta over r != t rows is 1 at s = 1; at
    step >= total_steps every beta is 1.

    alpha="min_snr" (our choice; the paper's exact form is unconfirmed): MinSNR-gamma turned into a
    weight on the velocity loss. On the linear path SNR(t) = ((1 - t) / t)^2 and ||x_hat - x|| = t ||v_hat - v||,
    so MinSNR's x-space weight min(SNR, gamma) is the v-space weight min(SNR, gamma) t^2. We evaluate SNR
    resolution-adjusted, a^2 SNR(t) (a = the objective's shift factor; this is the SNR of the unshifted time,
    since (1 - shift_a(t)) / shift_a(t) = (1 - t) / (a t)), which gives

        alpha(t) = min(a^2 (1 - t)^2, gamma t^2) / C,   C = E[min(a^2 (1 - t)^2, gamma t^2)] over the r = t rows,

    gamma = 5 (MinSNR's default), C by quadrature over the configured (shifted) distribution of t = max of
    the two draws, so alpha averages to 1 and the balance between r = t and r != t rows is unchanged.
    (Without the a^2 a shifted schedule would put nearly all r = t rows near zero weight: max alpha ~ 20 at
    a = sqrt(48); with it max alpha ~ 3.) alpha="none" gives alpha = 1 (the paper's DTD variant, Eq. 9).
    """

    total_steps: int
    k: float = 1.0
    alpha: Literal["none", "min_snr"] = "min_snr"
    gamma: float = 5.0
    beta_scale_method: Literal["quadrature", "monte_carlo"] = "quadrature"

    def __post_init__(self):
        if int(self.total_steps) < 1:
            raise ValueError(f"ImprovedSchedule.total_steps must be >= 1, got {self.total_steps!r}")
        if not self.k > 0:
            raise ValueError(f"ImprovedSchedule.k must be > 0, got {self.k!r}")
        if self.alpha not in ("none", "min_snr"):
            raise ValueError(f"ImprovedSchedule.alpha must be 'none' or 'min_snr', got {self.alpha!r}")
        if not self.gamma > 0:
            raise ValueError(f"ImprovedSchedule.gamma must be > 0, got {self.gamma!r}")
        if self.beta_scale_method not in ("quadrature", "monte_carlo"):
            raise ValueError("ImprovedSchedule.beta_scale_method must be 'quadrature' or 'monte_carlo', "
                             f"got {self.beta_scale_method!r}")

    def progress(self, step: int) -> float:
        """s = 1 - (step / total_steps)^k, with step clamped to [0, total_steps]: 1 at the start, 0 at the end."""
        frac = min(max(float(step), 0.0), float(self.total_steps)) / float(self.total_steps)
        return 1.0 - frac**self.k


def progressive_gap_weight(gap: Tensor, s: float, scale: float) -> Tensor:
    """beta(dt, s) = (1 - s) + scale s (1 - dt), scale = 1 / E[1 - dt] (lambda of arXiv 2511.19065)."""
    return (1.0 - s) + scale * s * (1.0 - gap)


def min_snr_velocity_weight(t: Tensor | np.ndarray, gamma: float = 5.0, shift: float = 1.0):
    """Unnormalised MinSNR-gamma weight of a velocity loss on the linear path, with the SNR of the unshifted
    time: min(a^2 (1 - t)^2, gamma t^2), a = shift (see ImprovedSchedule)."""
    if isinstance(t, np.ndarray):
        return np.minimum(shift**2 * (1.0 - t) ** 2, gamma * t**2)
    return torch.minimum(shift**2 * (1.0 - t).square(), gamma * t.square())


def unweighted_meanflow_error(sq_error: Tensor, t: Tensor, r: Tensor) -> dict[str, Tensor]:
    """The plain MSE ||u_theta - u_tgt||^2 / D of a MeanFlow batch, per row kind, for logging: the adaptively
    weighted loss L / sg(L + c) sits near 1 whenever L >> c and says nothing about progress (it is only a
    gradient scale). Keys: `mse` (all rows), `mse_r_eq_t` (rows with r = t: the instantaneous velocity) and
    `mse_r_neq_t` (r != t: the MeanFlow identity target); a key of a row kind absent from the batch is NaN."""
    per_row = sq_error.flatten(1).mean(dim=1).float()
    same = (r == t).float()

    def masked_mean(mask: Tensor) -> Tensor:  # no host sync: masked sums, NaN for an empty row kind
        count = mask.sum()
        return torch.where(count > 0, (per_row * mask).sum() / count.clamp(min=1.0), torch.full_like(count, math.nan))

    return {"mse": per_row.mean(), "mse_r_eq_t": masked_mean(same), "mse_r_neq_t": masked_mean(1.0 - same)}


class MeanFlowLoss:
    """MeanFlow objective, generalised (MeanFlow arXiv 2505.13447 Eq. 9-11; MF-RAE arXiv 2511.13019 Prop. 3.1):

        w      = (1 - lam) (e - x) + lam v_teacher(z_t, t, y)       lam = `teacher_mix` (`mixed_velocity`)
        u_tgt  = sg( w - (t - r) du_theta(z_t, r, t)/dt )             du/dt along (dz, dr, dt) = (w, 0, 1)
        L_i    = || u_theta(z_t, r, t, y) - u_tgt ||^2   (sum over latent elements)
        loss_i = L_i / sg(L_i + c)^p                                  (`adaptive_weighting`)

    with (t, r) from `PairSampler(time, shift, fraction_r_neq_t, r_neq_t_layout)` and z_t = (1 - t) x + t e.
    lam = 1 is MF-RAE's distillation (MFD), lam = 0 plain MeanFlow / MF-RAE's bootstrapping (MFT); the default
    is 1 with a teacher and 0 without. Rows with r = t need no derivative: their target is w exactly.

    derivative (kept as the attribute `time_derivative`, which code may replace by any other TimeDerivative):
      "finite_difference" (default, MF-RAE): `FiniteDifference(fd_step)`;
      "jvp": `JVP()`, exact forward-mode AD on the r != t rows;
      "finite_difference_fused": `FusedFiniteDifference(fd_step)`, the released MF-RAE 3B-batch layout.

    Labels are dropped to `null_class` with probability `label_dropout`, once per sample, before everything;
    the teacher and all stencil / guidance calls see the dropped label (null_class is required when
    label_dropout > 0 or with guidance). `guidance` adds CFG to the target (TrainingGuidance); `schedule` the
    arXiv 2511.19065 weights (ImprovedSchedule), applied after the adaptive normalisation. Returns
    per-sample losses [B].

    Caveat (measured on the 2-D toy): with a noisy target (lam < 1) and p > 0, the adaptive weight turns the
    regression into a residual-weighted one whose minimiser is not E[target | z_t]. In 2-D that bias
    ruins MFT (the toy uses p = 0 for MFT); with L summed over ~2e5 latent elements it is mild.
    """

    def __init__(
        self,
        teacher: Model | None = None,
        *,
        teacher_mix: float | None = None,
        time: TimeDistribution = TimeDistribution.logit_normal(-0.4, 1.0),
        shift: float = 1.0,
        fraction_r_neq_t: float = 0.25,
        r_neq_t_layout: Literal["random", "prefix"] = "random",
        derivative: Derivative = "finite_difference",
        fd_step: float = 5e-3,
        adaptive_p: float = 1.0,
        adaptive_c: float = 1e-2,
        adaptive_squared: bool = False,
        label_dropout: float = 0.1,
        null_class: int | None = None,
        guidance: TrainingGuidance | None = None,
        schedule: ImprovedSchedule | None = None,
    ):
        lam = (1.0 if teacher is not None else 0.0) if teacher_mix is None else float(teacher_mix)
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"teacher_mix (lambda) must be in [0, 1], got {teacher_mix!r}")
        if lam > 0 and teacher is None:
            raise ValueError(f"teacher_mix={lam} mixes in a teacher velocity, but no teacher was given")
        _check_step(fd_step)
        if adaptive_p < 0 or adaptive_c < 0:
            raise ValueError(f"adaptive_p and adaptive_c must be >= 0, got {adaptive_p!r}, {adaptive_c!r}")
        if guidance is not None and guidance.source == "teacher" and teacher is None:
            raise ValueError("guidance source 'teacher' needs a teacher")
        self.teacher = _frozen(teacher)
        self.teacher_mix = lam
        self.pairs = PairSampler(time, float(shift), float(fraction_r_neq_t), r_neq_t_layout)
        self.time_derivative = make_time_derivative(derivative, float(fd_step))
        self.adaptive_p = float(adaptive_p)
        self.adaptive_c = float(adaptive_c)
        self.adaptive_squared = bool(adaptive_squared)
        self.label_dropout = _check_label_dropout(label_dropout)
        uses = [name for name, used in (("label dropout", label_dropout > 0), ("guidance", guidance is not None))
                if used]
        self.null_class = _check_null_class(null_class, " and ".join(uses))
        self.guidance = guidance
        self.schedule = schedule
        self.last_stats: dict[str, Tensor] = {}  # `unweighted_meanflow_error` of the last call, for the log
        self.beta_scale = 1.0  # lambda of arXiv 2511.19065: 1 / E[1 - (t - r)] over the r != t rows
        self.alpha_norm = 1.0
        if schedule is not None:
            self.beta_scale = 1.0 / (1.0 - self.pairs.expected_gap(schedule.beta_scale_method))
            if schedule.alpha == "min_snr":
                self.alpha_norm = self.pairs.mean_over_r_equal_t_rows(
                    lambda t: min_snr_velocity_weight(t, schedule.gamma, self.pairs.shift))

    # -- the objective ---------------------------------------------------------------------------

    def __call__(self, net: Model, x: Tensor, y: Tensor, step: int = 0, part: BatchPart = WHOLE_BATCH) -> Tensor:
        _check_batch(x, y)
        y = drop_labels(y, self.label_dropout, self.null_class)  # once per sample, before every call
        t, r = self.pairs.sample(x.shape[0], x.device, part)  # r <= t
        noise = torch.randn_like(x)
        z = interpolate(x, noise, t)  # z_t = (1 - t) x + t e
        w = mixed_velocity(one_point_velocity(x, noise), self.teacher_velocity(z, t, y), self.teacher_mix)
        w = self.guided_velocity(net, w, z, t, y)  # v_tilde (MeanFlow Eq. 19); w without guidance
        u, u_tgt = self.prediction_and_target(net, z, t, r, y, w, self.gap_rows(t, r, part))  # sg(w - (t - r) du/dt)
        sq_error = (u - u_tgt).square()
        self.last_stats = unweighted_meanflow_error(sq_error.detach(), t, r)
        loss = adaptive_weighting(per_sample(sq_error, "sum"), self.adaptive_p, self.adaptive_c, self.adaptive_squared)
        return loss if self.schedule is None else loss * self.row_weights(t, r, step).to(loss.dtype)

    # -- its pieces (public so tests and callers can check each equation) -------------------------

    def teacher_velocity(self, z: Tensor, t: Tensor, y: Tensor) -> Tensor | None:
        """v_teacher(z_t, t, y) of the frozen teacher in z's dtype; None (not called) when teacher_mix = 0."""
        if self.teacher_mix == 0.0:
            return None
        return _call_frozen(self.teacher, z, t, y).to(z.dtype)

    def guided_velocity(self, net: Model, w: Tensor, z: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """v_tilde of TrainingGuidance on rows with t in the interval and a real label; w elsewhere."""
        g = self.guidance
        if g is None:
            return w
        null = self.null_class
        active = (t >= g.t_min) & (t <= g.t_max) & (y != null)
        if not bool(active.any()):
            return w
        source = net if g.source == "student" else self.teacher
        n = z.shape[0]
        both = _call_frozen(source, torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)]))
        u_cond, u_null = both[:n].to(w.dtype), both[n:].to(w.dtype)
        guided = g.omega * w + g.kappa * u_cond + (1.0 - g.omega - g.kappa) * u_null
        return torch.where(unsqueeze_like(active, w).bool(), guided, w)

    def gap_rows(self, t: Tensor, r: Tensor, part: BatchPart = WHOLE_BATCH) -> GapRows:
        """The r != t rows as the pair sampler lays them out in micro-batch `part`: a leading slice ("prefix")
        or found ("random")."""
        count = self.pairs.num_gap_rows(t.shape[0], part)
        return GapRows.find(t, r) if count is None else GapRows.leading(count)

    def prediction_and_target(self, net: Model, z: Tensor, t: Tensor, r: Tensor, y: Tensor, w: Tensor,
                              rows: GapRows | None = None) -> tuple[Tensor, Tensor]:
        """(u_theta(z, r, t, y) with grad, u_tgt = `meanflow_target` on the r != t rows and w on the rest).

        rows: the r != t rows (default `gap_rows(t, r)`, i.e. as this objective's pair sampler lays them out).
        """
        rows = self.gap_rows(t, r) if rows is None else rows
        u, dudt = self.time_derivative(net, z, t, r, y, w, rows)
        u_tgt = w.detach().clone()
        if rows.count:
            u_tgt[rows.index] = meanflow_target(*rows.take(w), dudt, *rows.take(t, r))
        return u, u_tgt

    def row_weights(self, t: Tensor, r: Tensor, step: int) -> Tensor:
        """Per-row arXiv 2511.19065 weights: beta(t - r, s) on r != t rows, alpha(t) on r = t rows (1 without a
        schedule)."""
        if self.schedule is None:
            return torch.ones_like(t)
        beta = progressive_gap_weight(t - r, self.schedule.progress(step), self.beta_scale)
        if self.schedule.alpha == "min_snr":
            alpha = min_snr_velocity_weight(t, self.schedule.gamma, self.pairs.shift) / self.alpha_norm
        else:
            alpha = torch.ones_like(t)
        return torch.where(r != t, beta, alpha)


__all__ = [
    "FlowMatchingLoss",
    "CMTLoss",
    "MeanFlowLoss",
    "TrainingGuidance",
    "ImprovedSchedule",
    "TrajectoryPairs",
    "trajectory_pairs",
    "drop_labels",
    "per_sample",
    "adaptive_weighting",
    "mixed_velocity",
    "meanflow_target",
    "unweighted_meanflow_error",
    "progressive_gap_weight",
    "min_snr_velocity_weight",
    "finite_difference_derivative",
    "jvp_with_primal",
    "GapRows",
    "TimeDerivative",
    "FiniteDifference",
    "FusedFiniteDifference",
    "JVP",
    "make_time_derivative",
    "DERIVATIVES",
]
