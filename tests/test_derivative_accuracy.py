"""mfrae.flow.derivative_accuracy: the float64 reference against a closed-form du/dt, the finite difference's
truncation order in float64, and rounding taking over at small h in float32 and bf16 (invariants of the numerics,
not captured numbers)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mfrae.flow.derivative_accuracy import (
    DEFAULT_STEPS,
    TF32Emulation,
    applicable_methods,
    derivative_accuracy,
    precision_region,
    reference_derivative,
    relative_error,
    round_to_tf32,
)
from mfrae.flow.objectives import FusedFiniteDifference, GapRows

# torch.func.jvp loads its decompositions with torch.jit.script on first use (torch-internal deprecation).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


class AnalyticNet(nn.Module):
    """u_i(z, r, t) = a z_i^2 t^3 + sin(sum_j z_j) (t - r) + cos(t) r: a MeanFlow 'network' with a closed-form
    transport derivative (`exact_dudt`), coupling the coordinates through sum_j z_j."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.7))

    def forward(self, z, t, y, r=None):
        r = t if r is None else r
        t_, r_ = t.view(-1, 1), r.view(-1, 1)
        s = z.sum(1, keepdim=True)
        return self.a * z.square() * t_**3 + torch.sin(s) * (t_ - r_) + torch.cos(t_) * r_


def exact_dudt(a: float, z, t, r, v):
    """d_t u + v . grad_z u of `AnalyticNet`, by hand: d_t u_i = 3 a z_i^2 t^2 + sin(S) - sin(t) r and
    (v . grad_z u)_i = 2 a z_i t^3 v_i + cos(S) (t - r) sum_j v_j, S = sum_j z_j."""
    t_, r_ = t.view(-1, 1), r.view(-1, 1)
    s = z.sum(1, keepdim=True)
    d_t = 3 * a * z.square() * t_**2 + torch.sin(s) - torch.sin(t_) * r_
    transport = 2 * a * z * t_**3 * v + torch.cos(s) * (t_ - r_) * v.sum(1, keepdim=True)
    return d_t + transport


class SmallMLP(nn.Module):
    """Linear layers (which bf16 autocast rounds) on [z, t, t - r]."""

    def __init__(self, dim: int = 16, hidden: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim + 2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, dim))

    def forward(self, z, t, y, r=None):
        r = t if r is None else r
        return self.mlp(torch.cat([z, t[:, None].to(z.dtype), (t - r)[:, None].to(z.dtype)], dim=1))


def _inputs(batch: int = 64, dim: int = 16):
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(batch, dim, generator=gen)
    t = 0.2 + 0.7 * torch.rand(batch, generator=gen)
    r = t * torch.rand(batch, generator=gen)
    v = torch.randn(batch, dim, generator=gen)
    return z, t, r, torch.zeros(batch, dtype=torch.long), v


def test_float64_reference_is_the_closed_form_derivative():
    net = AnalyticNet()
    z, t, r, y, v = _inputs()
    u, dudt = reference_derivative(net, z, t, r, y, v)
    assert dudt.dtype == torch.float64 and u.dtype == torch.float64
    a = net.a.item()  # the float32 parameter's exact value
    z, t, r, v = (x.double() for x in (z, t, r, v))
    assert relative_error(dudt, exact_dudt(a, z, t, r, v)) < 1e-12
    s = z.sum(1, keepdim=True)
    t_, r_ = t.view(-1, 1), r.view(-1, 1)
    assert relative_error(u, a * z.square() * t_**3 + torch.sin(s) * (t_ - r_) + torch.cos(t_) * r_) < 1e-14


def test_reference_leaves_the_net_in_float32():
    net = SmallMLP()
    reference_derivative(net, *_inputs())
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_central_difference_error_falls_as_h_squared_in_float64():
    """The library stencil is central: halving h divides its truncation error by 4. Run in float64 through the
    fused strategy (the library's float32 stencil casts to float32; the fused one keeps the caller's dtype)."""
    net = AnalyticNet().double()
    z, t, r, y, v = (x.double() if x.is_floating_point() else x for x in _inputs())
    exact = exact_dudt(net.a.item(), z, t, r, v)
    rows = GapRows.leading(z.shape[0])
    errors = []
    for h in (0.04, 0.02, 0.01):
        with torch.no_grad():
            _, dudt = FusedFiniteDifference(h)(net, z, t, r, y, v, rows)
        errors.append(relative_error(dudt, exact))
    for coarse, fine in zip(errors, errors[1:]):
        assert 3.6 < coarse / fine < 4.4, errors
    # at h = 1e-4 float64 has no rounding problem: the error is the truncation, ~(1e-4 / 1e-2)^2 of h = 1e-2's
    with torch.no_grad():
        _, dudt = FusedFiniteDifference(1e-4)(net, z, t, r, y, v, rows)
    assert relative_error(dudt, exact) < 2e-4 * errors[-1]


def test_float32_library_stencil_truncation_order_at_moderate_h():
    """In float32 too (the library stencil), h = 0.04 -> 0.02 is truncation-dominated: ratio ~4."""
    report = derivative_accuracy(AnalyticNet(), *_inputs(), steps=(0.04, 0.02), methods=("finite_difference",))
    coarse, fine = report.errors["finite_difference h=0.04"], report.errors["finite_difference h=0.02"]
    assert 3.5 < coarse / fine < 4.5


def test_float32_error_at_small_h_is_rounding():
    """Truncation error ~h^2 is negligible at h <= 1e-3 (float64 above), so in float32 the error grows as h shrinks
    (rounding ~ eps |u| / h): h = 1e-4 is worse than 1e-3, which is worse than 5e-3 is at most a few times; and the
    float32 JVP beats every step."""
    report = derivative_accuracy(AnalyticNet(), *_inputs(), steps=(1e-4, 1e-3))
    e4, e3 = report.errors["finite_difference h=0.0001"], report.errors["finite_difference h=0.001"]
    assert e4 > 4 * e3
    assert e4 > 1e-6  # far above what float64 gives at this h (previous test: truncation ~1e-9 relative)
    assert report.errors["jvp"] < 1e-5 and report.errors["jvp"] < e3 / 10


def test_library_stencil_ignores_bf16_autocast_and_the_fused_one_does_not():
    """`FiniteDifference` evaluates in float32 whatever the autocast: identical errors in both precisions. The fused
    stencil runs in bf16; its rounding error ~ ulp(u) / h grows as 1/h and is far above float32's."""
    net = SmallMLP()
    inputs = _inputs()
    f32 = derivative_accuracy(net, *inputs, precision="float32")
    bf16 = derivative_accuracy(net, *inputs, precision="bfloat16")
    for h in DEFAULT_STEPS:
        assert bf16.errors[f"finite_difference h={h:g}"] == f32.errors[f"finite_difference h={h:g}"]
        assert bf16.errors[f"finite_difference_fused h={h:g}"] > 10 * f32.errors[f"finite_difference_fused h={h:g}"]
    ratio = bf16.errors["finite_difference_fused h=0.001"] / bf16.errors["finite_difference_fused h=0.01"]
    assert 3 < ratio < 30  # ~10 for pure rounding
    # bf16 rounds the JVP's matmuls too, but once, not divided by h
    assert f32.errors["jvp"] < bf16.errors["jvp"] < bf16.errors["finite_difference_fused h=0.01"]
    assert f32.u_rms == bf16.u_rms and math.isfinite(f32.dudt_rms) and f32.dudt_rms > 0


def test_float32_fused_and_library_stencils_agree():
    """The two finite-difference layouts are the same formula: in float32 their errors agree to rounding."""
    report = derivative_accuracy(SmallMLP(), *_inputs(), steps=(5e-3,))
    lib, fused = report.errors["finite_difference h=0.005"], report.errors["finite_difference_fused h=0.005"]
    assert abs(lib - fused) < 0.2 * lib


def test_round_to_tf32_keeps_ten_mantissa_bits():
    """TF32: 10 explicit mantissa bits, round to nearest, ties away from zero."""
    one = torch.tensor([1.0, -1.0])
    half_ulp, ulp = 2.0**-11, 2.0**-10  # TF32 spacing at 1 is 2^-10
    assert torch.equal(round_to_tf32(one * (1 + ulp)), one * (1 + ulp))  # representable: unchanged
    assert torch.equal(round_to_tf32(one * (1 + half_ulp)), one * (1 + ulp))  # tie: away from zero
    assert torch.equal(round_to_tf32(one * (1 + half_ulp - 2.0**-20)), one)  # below the tie: down
    x = torch.randn(10_000) * torch.logspace(-20, 20, 10_000)
    rounded = round_to_tf32(x)
    assert ((rounded - x).abs() <= half_ulp * x.abs()).all()
    assert (rounded.view(torch.int32) & 0x1FFF == 0).all()  # the 13 dropped bits are clear
    with pytest.raises(ValueError, match="float32"):
        round_to_tf32(x.double())


def test_tf32_emulation_rounds_matmul_operands():
    a, b = torch.randn(8, 32), torch.randn(32, 8)
    with TF32Emulation():
        emulated = a @ b
    assert torch.allclose(emulated, round_to_tf32(a) @ round_to_tf32(b), rtol=0, atol=1e-5)
    assert not torch.allclose(emulated, a @ b, rtol=0, atol=1e-5)


def test_emulated_tf32_lies_between_float32_and_bf16():
    """TF32 keeps 3 more mantissa bits than bf16: its rounding error in the fused stencil is smaller than bf16's and
    larger than float32's at every h, and it reaches the JVP's tangents too. The library stencil (TF32 off on a
    GPU) is refused under the emulation."""
    net, inputs = SmallMLP(), _inputs()
    f32, tf32, bf16 = (derivative_accuracy(net, *inputs, precision=p) for p in ("float32", "tf32_emulated", "bfloat16"))
    assert set(tf32.errors) == {"jvp"} | {f"finite_difference_fused h={h:g}" for h in DEFAULT_STEPS}
    for h in DEFAULT_STEPS:
        key = f"finite_difference_fused h={h:g}"
        assert f32.errors[key] < tf32.errors[key] < bf16.errors[key]
    assert f32.errors["jvp"] < tf32.errors["jvp"] < bf16.errors["jvp"]
    assert "finite_difference" not in applicable_methods("tf32_emulated")
    with pytest.raises(ValueError, match="TF32 off"):
        derivative_accuracy(net, *inputs, precision="tf32_emulated", methods=("finite_difference",))


def test_precision_region_restores_the_tf32_flags():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with precision_region("tf32", torch.device("cpu")):
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    with precision_region("float32", torch.device("cpu")):
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.is_autocast_enabled("cpu")
    with precision_region("bfloat16", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_bad_arguments_are_rejected_by_name():
    net, inputs = SmallMLP(), _inputs()
    with pytest.raises(ValueError, match="precision"):
        derivative_accuracy(net, *inputs, precision="float16")
    with pytest.raises(ValueError, match="method"):
        derivative_accuracy(net, *inputs, methods=("secant",))
    with pytest.raises(ValueError, match="steps"):
        derivative_accuracy(net, *inputs, steps=(1e-3, 0.0))
    z, t, r, y, v = inputs
    with pytest.raises(ValueError, match="tangent"):
        derivative_accuracy(net, z, t, r, y, v[:, :3])
    with pytest.raises(ValueError, match="zero"):
        relative_error(torch.ones(3), torch.zeros(3))
    with pytest.raises(TypeError, match="nn.Module"):
        reference_derivative(lambda z, t, y, r=None: z, z, t, r, y, v)
