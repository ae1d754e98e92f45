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
allowed: real on CUDA, no effect on a CPU), "tf32_emulated" (float32 with the inputs of every matmul, convolution
and attention rounded to TF32's 10-bit mantissa by a dispatch mode: TF32 on any device, `round_to_tf32`) and
"bfloat16" (bf16 autocast on the tensors' device). Note what each strategy does with the precision:
`FiniteDifference` (the library default) always evaluates its stencil in strict float32 (TF32 off on CUDA)
whatever the caller's setting; `FusedFiniteDifference` (the layout of the released MF-RAE code, whose training
scripts run float32 with TF32 allowed) and `JVP` run in the caller's precision. Results: docs/derivative_accuracy.md.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from torch.utils._python_dispatch import TorchDispatchMode

from mfrae.flow.objectives import DERIVATIVES, GapRows, JVP, Model, make_time_derivative

__all__ = ["DEFAULT_STEPS", "PRECISIONS", "DerivativeAccuracy", "applicable_methods", "derivative_accuracy",
           "precision_region", "reference_derivative", "relative_error", "round_to_tf32", "strategy_label"]

PRECISIONS: tuple[str, ...] = ("float32", "tf32", "tf32_emulated", "bfloat16")
DEFAULT_STEPS: tuple[float, ...] = (1e-4, 1e-3, 5e-3, 1e-2)  # MF-RAE Table 3's steps (5e-3 is its default)
FINITE_DIFFERENCES: tuple[str, ...] = ("finite_difference", "finite_difference_fused")


def relative_error(estimate: Tensor, reference: Tensor) -> float:
    """Relative L2 error ||estimate - reference|| / ||reference|| over the whole batch, computed in float64: the
    measure of du/dt's accuracy here (MF-RAE arXiv 2511.13019 Table 3 compares the steps by FID instead)."""
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


def round_to_tf32(x: Tensor) -> Tensor:
    """float32 values rounded to TF32 (8-bit exponent, 10-bit mantissa: unit roundoff 2^-11 ~ 4.9e-4), to nearest
    with ties away from zero (PTX cvt.rna.tf32.f32), returned as float32; what TF32 tensor cores do to the
    inputs of a float32 matmul or convolution. Infinities and NaN are not treated."""
    if x.dtype != torch.float32:
        raise ValueError(f"round_to_tf32 takes float32, got {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)  # add half of the 13 dropped bits' range, clear them


_aten = torch.ops.aten
# op: positions of its float32 operands that TF32 hardware would round (bias / accumulator operands excluded)
_TF32_OPERANDS = {
    _aten.mm.default: (0, 1), _aten.bmm.default: (0, 1), _aten.addmm.default: (1, 2), _aten.baddbmm.default: (1, 2),
    _aten.convolution.default: (0, 1),
    _aten._scaled_dot_product_flash_attention_for_cpu.default: (0, 1, 2),
    _aten._scaled_dot_product_efficient_attention.default: (0, 1, 2),
    _aten._scaled_dot_product_flash_attention.default: (0, 1, 2),
}


class TF32Emulation(TorchDispatchMode):
    """Rounds the float32 operands of matmuls, convolutions and fused attention to TF32 (`round_to_tf32`) below
    autograd and torch.func, so forward passes, finite differences and JVP tangents all see it. An emulation of
    `torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True` on any device; it cannot see
    `strict_float32_region` (which turns the CUDA flags off), so the library stencil is not measured under it."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        positions = _TF32_OPERANDS.get(func)
        if positions:
            args = list(args)
            for i in positions:
                if isinstance(args[i], Tensor) and args[i].dtype == torch.float32:
                    args[i] = round_to_tf32(args[i])
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def precision_region(precision: str, device: torch.device) -> Iterator[None]:
    """The numeric setting a strategy is measured under: "float32" (autocast off; TF32 off on CUDA), "tf32" (float32
    with TF32 matmuls and cuDNN convolutions allowed; meaningful on CUDA only), "tf32_emulated" (float32 with the
    CUDA flags off and `TF32Emulation` instead, on any device) or "bfloat16" (bf16 autocast on `device`). The
    process-wide TF32 flags are restored on exit."""
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
        with region, (TF32Emulation() if precision == "tf32_emulated" else contextlib.nullcontext()):
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


def applicable_methods(precision: str) -> tuple[str, ...]:
    """The strategies measured under `precision` by default: all, except the library stencil under
    "tf32_emulated" (on a GPU it runs with TF32 off, which the emulation cannot see)."""
    if precision == "tf32_emulated":
        return ("jvp", "finite_difference_fused")
    return ("jvp", *FINITE_DIFFERENCES)


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
    methods: Sequence[str] | None = None,
    reference: tuple[Tensor, Tensor] | None = None,
) -> DerivativeAccuracy:
    """Relative error of du/dt (tangent (dz, dr, dt) = (v, 0, 1), MeanFlow arXiv 2505.13447 Eq. 8) from each of the
    library's strategies, at each finite-difference step h in `steps` (MF-RAE arXiv 2511.13019 Table 3), run under
    `precision` (`precision_region`), against the float64 JVP (`reference_derivative`; pass `reference=(u, dudt)`
    to reuse one across precisions).

    Every row is treated as an r != t row (give r < t). z, t, r, v are float32 tensors (z [B, ...], t and r [B],
    v like z), y the labels [B]. The strategies are built by `make_time_derivative(method, h)` and called as the
    MeanFlow objective calls them, under no_grad. `methods` defaults to `applicable_methods(precision)`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    methods = applicable_methods(precision) if methods is None else tuple(methods)
    unknown = sorted(set(methods) - set(DERIVATIVES))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {DERIVATIVES}")
    if precision == "tf32_emulated" and "finite_difference" in methods:
        raise ValueError("the library stencil (finite_difference) runs with TF32 off on a GPU, which tf32_emulated "
                         "cannot reproduce; measure it under 'tf32' on CUDA, or use finite_difference_fused")
    steps = tuple(float(h) for h in steps)
    if any(not h > 0 for h in steps):
        raise ValueError(f"finite-difference steps must be > 0, got {steps}")
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
