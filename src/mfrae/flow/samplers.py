"""Samplers: ODE integration of a velocity model (Euler / Heun, optionally guided) and MeanFlow k-step jumps.

Two levels, for both kinds of model:

    solve_ode(velocity, noise, grid)          integrate dz/dt = v(z, t) for a velocity function v(z, t)
    flow_matching_sample(model, noise, y)     a velocity model `model(z, t, y)` (guided or not) on the shifted grid
    meanflow_sample(model, noise, y, steps)   a MeanFlow model `model(z, t, y, r=r)`: k average-velocity jumps

Time runs from t = 1 (noise) down to the end of the grid.

ODE sampling (the released RAE sampler, arXiv 2510.11690): Euler on the shifted grid

    t_i = shift_a(1 - (1 - t_end) i / (N - 1)),   i = 0..N-1,   N = 50, t_end = 0.001,

i.e. 49 network evaluations at t_0 = 1.0, t_1 = 0.997005, ... and an end state at t = 0.006887 for
a = sqrt(48), decoded as is (no final denoising step). Heun (torchdiffeq "heun2") uses the same grid
with two evaluations per step.

Guidance, applied only to rows whose t lies in [t_min, t_max] (inclusive):

    CFG (Ho & Salimans, arXiv 2207.12598):        v = v(z, t, null) + w (v(z, t, y) - v(z, t, null))
    AutoGuidance (Karras et al., arXiv 2406.02507): v = v_weak(z, t, y) + w (v(z, t, y) - v_weak(z, t, y))

MeanFlow sampling (MeanFlow arXiv 2505.13447 Eq. 12, Alg. 2) on a grid 1 = t_0 > t_1 > ... > t_k = 0:

    z <- z - (t_i - t_{i+1}) u(z, r = t_{i+1}, t = t_i);   1 step: x = e - u(e, 0, 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from mfrae.flow.paths import time_shift, unsqueeze_like

VelocityFn = Callable[[Tensor, Tensor], Tensor]
"""v(z, t): a velocity field with the label (and any guidance) already bound; t is float32 [B]."""

ODEMethod = Literal["euler", "heun"]
ODE_METHODS: tuple[str, ...] = ("euler", "heun")


#################################################################################
#                                   Grids                                       #
#################################################################################


def _check_grid(grid: Tensor, name: str = "grid") -> Tensor:
    grid = torch.as_tensor(grid, dtype=torch.float64)
    if grid.dim() != 1 or grid.numel() < 2:
        raise ValueError(f"{name} must be a 1-D sequence of at least 2 times, got shape {tuple(grid.shape)}")
    if not bool(torch.all(grid[1:] < grid[:-1])):
        raise ValueError(f"{name} must be strictly decreasing (from noise t=1 towards data t=0), got {grid.tolist()}")
    if grid.min() < 0 or grid.max() > 1:
        raise ValueError(f"{name} times must lie in [0, 1], got {grid.tolist()}")
    return grid


def ode_grid(num_points: int = 50, shift: float = 1.0, t_end: float = 0.001) -> Tensor:
    """Shifted sampling grid t_i = shift_a(1 - (1 - t_end) i / (num_points - 1)), float64 [num_points].

    The defaults with shift = sqrt(48) reproduce the grid of the released RAE ImageNet-256 sampler.
    """
    if num_points < 2:
        raise ValueError(f"an ODE grid needs at least 2 points, got num_points={num_points!r}")
    if not 0.0 <= t_end < 1.0:
        raise ValueError(f"t_end must be in [0, 1), got {t_end!r}")
    nominal = 1.0 - (1.0 - t_end) * torch.arange(num_points, dtype=torch.float64) / (num_points - 1)
    return time_shift(nominal, shift)


def meanflow_grid(num_steps: int) -> Tensor:
    """Uniform MeanFlow grid 1 = t_0 > ... > t_k = 0 with k = num_steps jumps (unshifted, as the official samplers)."""
    if num_steps < 1:
        raise ValueError(f"MeanFlow sampling needs at least one step, got num_steps={num_steps!r}")
    return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)


#################################################################################
#                          Velocity fields (guidance)                           #
#################################################################################


def _in_interval(t: Tensor, interval: tuple[float, float]) -> Tensor:
    t_min, t_max = interval
    return (t >= t_min) & (t <= t_max)


def _check_interval(interval: tuple[float, float]) -> tuple[float, float]:
    t_min, t_max = (float(v) for v in interval)
    if not t_min <= t_max:
        raise ValueError(f"guidance interval must satisfy t_min <= t_max, got {interval!r}")
    return t_min, t_max


def labelled_velocity_fn(model: Callable[..., Tensor], y: Tensor) -> VelocityFn:
    """v(z, t) = model(z, t, y): the model with the labels `y` bound, no guidance."""
    return lambda z, t: model(z, t, y)


def cfg_velocity_fn(
    model: Callable[..., Tensor],
    y: Tensor,
    scale: float,
    interval: tuple[float, float] = (0.0, 1.0),
    null_class: int | None = None,
) -> VelocityFn:
    """Classifier-free guidance: v = v(z,t,null) + scale (v(z,t,y) - v(z,t,null)) for t in the interval, else v(z,t,y).

    Labelled and null-label rows go through the model as one doubled batch [z; z], [y; null]
    (as the official `forward_with_cfg`); scale = 1 is `labelled_velocity_fn`, one call of B rows.
    """
    interval = _check_interval(interval)
    if scale == 1.0:
        return labelled_velocity_fn(model, y)
    null = getattr(model, "null_class", None) if null_class is None else null_class
    if null is None:
        raise ValueError("classifier-free guidance needs the null label: the model has no `null_class`; "
                         "pass null_class")

    def velocity(z: Tensor, t: Tensor) -> Tensor:
        guided = _in_interval(t, interval)
        if not bool(guided.any()):
            return model(z, t, y)
        labels = torch.cat([y, torch.full_like(y, null)])
        v_cond, v_uncond = model(torch.cat([z, z]), torch.cat([t, t]), labels).chunk(2)
        v_guided = v_uncond + scale * (v_cond - v_uncond)
        return torch.where(unsqueeze_like(guided, z).bool(), v_guided, v_cond)

    return velocity


def autoguidance_velocity_fn(
    model: Callable[..., Tensor],
    weak_model: Callable[..., Tensor],
    y: Tensor,
    scale: float,
    interval: tuple[float, float] = (0.0, 1.0),
) -> VelocityFn:
    """AutoGuidance (Karras et al. 2024): v = v_weak(z,t,y) + scale (v(z,t,y) - v_weak(z,t,y)) for t in the
    interval, else v(z,t,y). Both models see the real label (as the released RAE sampler, whose interval is [0, 1])."""
    interval = _check_interval(interval)
    if scale == 1.0:
        return labelled_velocity_fn(model, y)

    def velocity(z: Tensor, t: Tensor) -> Tensor:
        v_main = model(z, t, y)
        guided = _in_interval(t, interval)
        if not bool(guided.any()):
            return v_main
        v_weak = weak_model(z, t, y)
        return torch.where(unsqueeze_like(guided, z).bool(), v_weak + scale * (v_main - v_weak), v_main)

    return velocity


#################################################################################
#                                ODE solvers                                    #
#################################################################################


@torch.no_grad()
def solve_ode(
    velocity: VelocityFn,
    noise: Tensor,
    grid: Tensor | Sequence[float],
    method: ODEMethod = "euler",
    return_trajectory: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Integrate dz/dt = v(z, t) from grid[0] down to grid[-1], starting at z = noise.

    Euler:  z_{i+1} = z_i + (t_{i+1} - t_i) v(z_i, t_i)                                   (N - 1 evaluations)
    Heun:   z'      = z_i + (t_{i+1} - t_i) v(z_i, t_i)
            z_{i+1} = z_i + (t_{i+1} - t_i) (v(z_i, t_i) + v(z', t_{i+1})) / 2            (2 (N - 1) evaluations)

    Returns the end state, or (end state, trajectory [N, *noise.shape]) with return_trajectory.
    """
    if method not in ODE_METHODS:
        raise ValueError(f"unknown ODE method {method!r}; choose one of {ODE_METHODS}")
    grid = _check_grid(grid)
    batch = noise.shape[0]
    z = noise
    states = [z]
    for t_cur, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        dt = t_next - t_cur
        t_vec = torch.full((batch,), t_cur, device=noise.device, dtype=torch.float32)
        v = velocity(z, t_vec)
        if method == "euler":
            z = z + dt * v
        else:
            z_pred = z + dt * v
            v_next = velocity(z_pred, torch.full_like(t_vec, t_next))
            z = z + dt * 0.5 * (v + v_next)
        if return_trajectory:
            states.append(z)
    return (z, torch.stack(states)) if return_trajectory else z


def flow_matching_sample(
    model: nn.Module | Callable[..., Tensor],
    noise: Tensor,
    y: Tensor,
    num_points: int = 50,
    shift: float = 1.0,
    t_end: float = 0.001,
    method: ODEMethod = "euler",
    cfg_scale: float = 1.0,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    weak_model: nn.Module | Callable[..., Tensor] | None = None,
    autoguidance_scale: float = 1.0,
) -> Tensor:
    """Samples of a velocity model `model(z, t, y)` (a flow-matching teacher): `solve_ode` on
    `ode_grid(num_points, shift, t_end)` with optional CFG or AutoGuidance (not both)."""
    if weak_model is not None and cfg_scale != 1.0:
        raise ValueError("choose either classifier-free guidance (cfg_scale) or AutoGuidance (weak_model), not both")
    if weak_model is not None:
        velocity = autoguidance_velocity_fn(model, weak_model, y, autoguidance_scale, cfg_interval)
    else:
        velocity = cfg_velocity_fn(model, y, cfg_scale, cfg_interval)
    return solve_ode(velocity, noise, ode_grid(num_points, shift, t_end), method)


#################################################################################
#                              MeanFlow sampling                                #
#################################################################################


@torch.no_grad()
def meanflow_sample(
    model: nn.Module | Callable[..., Tensor],
    noise: Tensor,
    y: Tensor,
    steps: int | Tensor | Sequence[float] = 1,
    return_trajectory: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """MeanFlow k-step sampling: z <- z - (t_i - t_{i+1}) u(z, r = t_{i+1}, t = t_i) along the grid
    (MeanFlow arXiv 2505.13447 Eq. 12).

    `steps` is a number of uniform jumps (1 -> [1, 0], 2 -> [1, 0.5, 0], ...) or an explicit strictly
    decreasing grid. Returns the end state, or (end state, states [k + 1, *noise.shape]).
    """
    grid = meanflow_grid(steps) if isinstance(steps, int) else _check_grid(steps, "MeanFlow grid")
    batch = noise.shape[0]
    z = noise
    states = [z]
    for t_cur, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        t_vec = torch.full((batch,), t_cur, device=noise.device, dtype=torch.float32)
        r_vec = torch.full((batch,), t_next, device=noise.device, dtype=torch.float32)
        z = z - (t_cur - t_next) * model(z, t_vec, y, r=r_vec)
        if return_trajectory:
            states.append(z)
    return (z, torch.stack(states)) if return_trajectory else z



__all__ = [
    "VelocityFn",
    "ODE_METHODS",
    "ode_grid",
    "meanflow_grid",
    "labelled_velocity_fn",
    "cfg_velocity_fn",
    "autoguidance_velocity_fn",
    "solve_ode",
    "flow_matching_sample",
    "meanflow_sample",
]
