"""How accurate is the du/dt a MeanFlow objective trains with? A measurement of the library's own time-derivative
strategies (`mfrae.flow.objectives`) against a float64 reference.

MeanFlow's target needs the transport derivative of the average velocity along the trajectory,

    du/dt = d_t u(z, r, t) + v . grad_z u(z, r, t),

the Jacobian-vector product of (z, r, t) -> u with tangent (dz, dr, dt) = (v, 0, 1) (MeanFlow arXiv 2505.13447
Eq. 8). MF-RAE (arXiv 2511.13019, Sec. 4 and Table 3) replaces the JVP by a central finite difference of step h
and reports that h in 1e-3..1e-2 matches the JVP while h = 1e-4 degrades (in FID after training). Here the
derivative itself is compared: each strategy is called exactly as the objectives call it
(`make_time_derivative(method, h)(net, z, t, r, y, v, rows)`, every row r != t) under a stated precision, and its
du/dt is compared with `JVP()` run on a float64 copy of the same weights.

    report = derivative_accuracy(net, z, t, r, y, v, steps=(1e-4, 1e-3, 5e-3, 1e-2), precision="bfloat16")
    report.errors  # {"jvp": ..., "finite_difference h=0.0001": ..., "finite_difference_fused h=0.0001": ...}

Precisions: "float32" (autocast off, TF32 off on CUDA), "tf32" (float32 with TF32 matmuls and cuDNN convolutions
allowed, CUDA only), "bfloat16" (bf16 autocast on the tensors' device). Note what each strategy does with the
precision: `FiniteDifference` (the library default) always evaluates its stencil in strict float32 whatever the
caller's setting; `FusedFiniteDifference` (the layout of the released MF-RAE code) and `JVP` run in the caller's
precision. Results: docs/derivative_accuracy.md.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mfrae.flow.objectives import DERIVATIVES, GapRows, JVP, Model, make_time_derivative

__all__ = ["DEFAULT_STEPS", "PRECISIONS", "DerivativeAccuracy", "derivative_accuracy", "precision_region",
           "reference_derivative", "relative_error", "strategy_label"]

PRECISIONS: tuple[str, ...] = ("float32", "tf32", "bfloat16")
DEFAULT_STEPS: tuple[float, ...] = (1e-4, 1e-3, 5e-3, 1e-2)  # MF-RAE Table 3's steps (5e-3 is its default)
FINITE_DIFFERENCES: tuple[str, ...] = ("finite_difference", "finite_difference_fused")


def relative_error(estimate: Tensor, reference: Tensor) -> float:
    """Relative L2 error ||estimate - reference|| / ||reference|| over the whole batch, computed in float64."""
    if estimate.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(estimate.shape)} vs {tuple(reference.shape)}")
    ref = reference.detach().double()
    norm = ref.norm()
    if not norm > 0:
        raise ValueError("the reference derivative is zero: a relative error is undefined (a zero-initialised "
                         "output layer predicts u = 0; give the net non-zero output weights)")
    return float((estimate.detach().double() - ref).norm() / norm)


def strategy_label(method: str, step: float | None = None) -> str:
    """The key of one strategy in `DerivativeAccuracy.errors`: "jvp", or e.g. "finite_difference h=0.005"."""
    return method if step is None else f"{method} h={step:g}"


@contextlib.contextmanager
def precision_region(precision: str, device: torch.device) -> Iterator[None]:
    """The numeric setting a strategy is measured under: "float32" (autocast off; TF32 off on CUDA), "tf32" (float32
    with TF32 matmuls and cuDNN convolutions allowed; meaningful on CUDA only) or "bfloat16" (bf16 autocast on
    `device`). The process-wide TF32 flags are restored on exit."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        if precision == "bfloat16":
            region = torch.autocast(device.type, dtype=torch.bfloat16)
        elif torch.amp.is_autocast_available(device.type):
            region = torch.autocast(device.type, enabled=False)
        else:
            region = contextlib.nullcontext()
        with region:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def reference_derivative(net: Model, z: Tensor, t: Tensor, r: Tensor, y: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(u, du/dt) in float64: the library's `JVP()` strategy on a float64 copy of `net` (an nn.Module; the original
    is left as it is), inputs and tangent cast to float64, autocast off (MeanFlow arXiv 2505.13447 Eq. 8, exact up
    to float64 rounding and to whatever the net computes in float32 on purpose, e.g. DiT^DH's time embedding)."""
    if not isinstance(net, nn.Module):
        raise TypeError("the float64 reference copies the network's weights: pass an nn.Module")
    net64 = copy.deepcopy(net).double().eval()
    z64, t64, r64, v64 = (x.detach().double() for x in (z, t, r, v))
    with torch.no_grad(), precision_region("float32", z.device):
        u, dudt = JVP()(net64, z64, t64, r64, y, v64, GapRows.leading(z.shape[0]))
    return u.detach(), dudt.detach()


@dataclass
class DerivativeAccuracy:
    """Relative L2 errors of du/dt per strategy (keys from `strategy_label`) under one precision, against the
    float64 JVP; `u_rms` and `dudt_rms` (of the reference) say how large the quantities measured were."""

    precision: str
    steps: tuple[float, ...]
    errors: dict[str, float] = field(default_factory=dict)
    u_rms: float = float("nan")
    dudt_rms: float = float("nan")

    def to_dict(self) -> dict:
        return {"precision": self.precision, "steps": list(self.steps), "errors": dict(self.errors),
                "u_rms": self.u_rms, "dudt_rms": self.dudt_rms}


def derivative_accuracy(
    net: Model,
    z: Tensor,
    t: Tensor,
    r: Tensor,
    y: Tensor,
    v: Tensor,
    steps: Sequence[float] = DEFAULT_STEPS,
    precision: str = "float32",
    methods: Sequence[str] = ("jvp", *FINITE_DIFFERENCES),
    reference: tuple[Tensor, Tensor] | None = None,
) -> DerivativeAccuracy:
    """Relative error of du/dt (tangent (dz, dr, dt) = (v, 0, 1), MeanFlow arXiv 2505.13447 Eq. 8) from each of the
    library's strategies, at each finite-difference step h in `steps` (MF-RAE arXiv 2511.13019 Table 3), run under
    `precision` (`precision_region`), against the float64 JVP (`reference_derivative`; pass `reference=(u, dudt)`
    to reuse one across precisions).

    Every row is treated as an r != t row (give r < t). z, t, r, v are float32 tensors (z [B, ...], t and r [B],
    v like z), y the labels [B]. The strategies are built by `make_time_derivative(method, h)` and called as the
    MeanFlow objective calls them, under no_grad.
    """
    unknown = sorted(set(methods) - set(DERIVATIVES))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {DERIVATIVES}")
    steps = tuple(float(h) for h in steps)
    if any(not h > 0 for h in steps):
        raise ValueError(f"finite-difference steps must be > 0, got {steps}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if v.shape != z.shape:
        raise ValueError(f"the tangent v must have z's shape {tuple(z.shape)}, got {tuple(v.shape)}")
    u_ref, dudt_ref = reference if reference is not None else reference_derivative(net, z, t, r, y, v)
    report = DerivativeAccuracy(precision, steps, u_rms=float(u_ref.double().square().mean().sqrt()),
                                dudt_rms=float(dudt_ref.double().square().mean().sqrt()))
    rows = GapRows.leading(z.shape[0])
    for method in methods:
        for h in (steps if method in FINITE_DIFFERENCES else (None,)):
            strategy = make_time_derivative(method, h) if h is not None else make_time_derivative(method)
            with torch.no_grad(), precision_region(precision, z.device):
                _, dudt = strategy(net, z, t, r, y, v, rows)
            report.errors[strategy_label(method, h)] = relative_error(dudt, dudt_ref)
    return report
