"""Paths, time distributions, shift, pair sampler and samplers, checked against closed forms and published numbers."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import special

from mfrae.flow.paths import (
    PairSampler,
    TimeDistribution,
    dimension_shift,
    interpolate,
    one_point_velocity,
    time_shift,
)
from mfrae.flow.samplers import (
    autoguidance_velocity_fn,
    cfg_velocity_fn,
    flow_matching_sample,
    labelled_velocity_fn,
    meanflow_grid,
    meanflow_sample,
    ode_grid,
    solve_ode,
)
from mfrae.flow.toy import GaussianMixture, MixtureOracle

SHIFT_256 = math.sqrt(48)

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster and steadier


def single_gaussian(mean=(1.0, -0.5), std=0.5) -> GaussianMixture:
    return GaussianMixture(torch.tensor([mean], dtype=torch.float64), std)


def gaussian_flow(z: torch.Tensor, t: float, r: float, mean: torch.Tensor, std: float) -> torch.Tensor:
    """Exact flow of N(m, s^2 I) data on the linear path: the standardised coordinate is conserved,
    z_r = (1 - r) m + sigma_r / sigma_t (z_t - (1 - t) m), sigma_t^2 = (1 - t)^2 s^2 + t^2."""
    sigma = lambda u: math.sqrt((1 - u) ** 2 * std**2 + u**2)  # noqa: E731
    return (1 - r) * mean + sigma(r) / sigma(t) * (z - (1 - t) * mean)


# ----------------------------------------------------------------------------------- path


def test_linear_path_endpoints_and_velocity():
    x, e = torch.randn(5, 3), torch.randn(5, 3)
    assert torch.equal(interpolate(x, e, 0.0), x)
    assert torch.equal(interpolate(x, e, 1.0), e)
    t = torch.rand(5)
    # the path is linear in t, so a finite difference of any step gives the velocity e - x exactly (up to fp)
    dz = (interpolate(x, e, t + 0.25) - interpolate(x, e, t)) / 0.25
    torch.testing.assert_close(dz, one_point_velocity(x, e), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        interpolate(x, e, torch.rand(4))
    with pytest.raises(ValueError, match="shapes differ"):
        interpolate(x, e[:, :2], 0.5)


# ----------------------------------------------------------------------------------- shift


def test_shift_endpoints_monotone_and_published_values():
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    for a in (0.5, 1.0, SHIFT_256, 13.856406):
        s = time_shift(t, a)
        assert s[0] == 0 and s[-1] == 1
        assert bool(torch.all(s[1:] > s[:-1])), f"shift {a} not strictly increasing"
    # the shifted times of the released RAE ImageNet-256 setup, a = sqrt(48)
    probe = torch.tensor([0.001, 0.25, 0.5, 0.75, 0.999], dtype=torch.float64)
    expected = torch.tensor([0.006887, 0.697831, 0.873868, 0.954096, 0.999856], dtype=torch.float64)
    torch.testing.assert_close(time_shift(probe, SHIFT_256), expected, atol=1e-6, rtol=0)
    # a > 1 moves every interior time towards noise
    assert bool(torch.all(time_shift(t[1:-1], SHIFT_256) > t[1:-1]))
    with pytest.raises(ValueError, match="shift factor"):
        time_shift(t, 0.0)


def test_dimension_shift():
    assert dimension_shift((768, 16, 16)) == pytest.approx(6.928203, abs=1e-6)
    assert dimension_shift((768, 32, 32)) == pytest.approx(13.856406, abs=1e-6)
    assert dimension_shift((4, 32, 32)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="positive sizes"):
        dimension_shift((768, 0, 16))


# ----------------------------------------------------------------------------------- time distributions


def test_time_distribution_moments():
    torch.manual_seed(0)
    n = 200_000
    u = TimeDistribution.uniform(0.2, 0.7).sample(n)
    assert float(u.min()) >= 0.2 and float(u.max()) <= 0.7
    assert float(u.mean()) == pytest.approx(0.45, abs=0.003)
    ln = TimeDistribution.logit_normal(-0.4, 1.0).sample(n).double()
    logits = torch.log(ln) - torch.log1p(-ln)
    assert float(logits.mean()) == pytest.approx(-0.4, abs=0.01)
    assert float(logits.std()) == pytest.approx(1.0, abs=0.01)
    # truncated logit-normal: inside the bounds, with the truncated normal's mean in logit space,
    # E[N | a < N < b] = (phi(a) - phi(b)) / (Phi(b) - Phi(a)) for N ~ N(0, 1)
    tr = TimeDistribution.logit_normal(0.0, 1.0, 0.2, 0.7).sample(n).double()
    assert float(tr.min()) >= 0.2 and float(tr.max()) <= 0.7
    a, b = special.logit(0.2), special.logit(0.7)
    phi = lambda v: math.exp(-v * v / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    truncated_mean = (phi(a) - phi(b)) / (special.ndtr(b) - special.ndtr(a))
    assert float((torch.log(tr) - torch.log1p(-tr)).mean()) == pytest.approx(truncated_mean, abs=0.01)
    # shifted sampling is the shift of the base sample (same RNG stream)
    torch.manual_seed(1)
    base = TimeDistribution.uniform().sample(10)
    torch.manual_seed(1)
    torch.testing.assert_close(TimeDistribution.uniform().sample(10, shift=3.0), time_shift(base, 3.0))


@pytest.mark.parametrize("kwargs", [dict(kind="beta"), dict(low=0.5, high=0.5), dict(sigma=0.0), dict(high=1.5)])
def test_time_distribution_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        TimeDistribution(**kwargs)


def test_pair_sampler_fraction_order_and_marginals():
    torch.manual_seed(0)
    n = 100_000
    t, r = PairSampler(TimeDistribution.uniform(), 1.0, 0.25).sample(n)
    assert t.dtype == torch.float32 and bool(torch.all(r <= t))
    frac = float((r != t).float().mean())
    assert abs(frac - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)
    # t is the max of two uniforms: E[t] = 2/3; r on r != t rows is the min: E[r] = 1/3
    assert float(t.mean()) == pytest.approx(2 / 3, abs=0.005)
    assert float(r[r != t].mean()) == pytest.approx(1 / 3, abs=0.01)
    t0, r0 = PairSampler(fraction_r_neq_t=0.0).sample(1000)
    assert torch.equal(t0, r0)
    with pytest.raises(ValueError, match="fraction_r_neq_t"):
        PairSampler(fraction_r_neq_t=1.5)


def test_expected_gap_closed_form_and_published_lambda():
    # two iid U[0, 1]: E|U1 - U2| = 1/3
    assert PairSampler(TimeDistribution.uniform()).expected_gap() == pytest.approx(1 / 3, abs=1e-9)
    # MeanFlow's sampler lognorm(-0.4, 1): E[dt] ~ 0.2333, lambda ~ 1.3046 (as quoted for arXiv 2511.19065)
    mf = PairSampler(TimeDistribution.logit_normal(-0.4, 1.0))
    gap = mf.expected_gap()
    assert gap == pytest.approx(0.2333, abs=2e-4)
    assert 1 / (1 - gap) == pytest.approx(1.3046, abs=1e-3)
    # quadrature and an independent fixed-seed Monte Carlo agree, also with a shift and truncation
    shifted = PairSampler(TimeDistribution.logit_normal(0.0, 1.0, 0.0, 0.999), SHIFT_256)
    assert shifted.expected_gap() == pytest.approx(shifted.expected_gap("monte_carlo", 1 << 19), abs=2e-3)


# ----------------------------------------------------------------------------------- ODE grid and solvers


def test_ode_grid_reproduces_released_rae_grid():
    grid = ode_grid(50, SHIFT_256)
    assert grid.shape == (50,)
    evaluations = []

    def recording_velocity(z, t):
        evaluations.append(float(t[0]))
        return torch.zeros_like(z)

    solve_ode(recording_velocity, torch.zeros(2, 3), grid, "euler")
    assert len(evaluations) == 49
    torch.testing.assert_close(torch.tensor(evaluations[:5], dtype=torch.float64),
                               torch.tensor([1.0, 0.997005, 0.993902, 0.990684, 0.987346], dtype=torch.float64),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(evaluations[-3:], dtype=torch.float64),
                               torch.tensor([0.314706, 0.231979, 0.131505], dtype=torch.float64), atol=1e-6, rtol=0)
    assert float(grid[-1]) == pytest.approx(0.006887, abs=1e-6)
    # 512 grid
    g512 = ode_grid(50, math.sqrt(192))
    assert [round(float(v), 6) for v in g512[:3]] == [1.0, 0.9985, 0.996942]
    assert [round(float(v), 6) for v in g512[-3:-1]] == [0.376595, 0.232443]
    assert float(g512[-1]) == pytest.approx(0.013681, abs=1e-6)
    # Heun: two evaluations per step
    evaluations.clear()
    solve_ode(recording_velocity, torch.zeros(2, 3), grid, "heun")
    assert len(evaluations) == 98


def test_ode_solvers_converge_at_their_order_to_the_exact_gaussian_flow():
    g = single_gaussian()
    torch.manual_seed(0)
    z = torch.randn(256, 2, dtype=torch.float64)
    exact = gaussian_flow(z, 1.0, 0.0, g.means[0], g.std)
    velocity = lambda zz, t: g.velocity(zz, t)  # noqa: E731

    def err(method, n):
        return float((solve_ode(velocity, z, ode_grid(n, 1.0, 0.0), method) - exact).abs().max())

    e_coarse, e_fine = err("euler", 33), err("euler", 65)
    assert 1.7 < e_coarse / e_fine < 2.3, (e_coarse, e_fine)  # first order
    h_coarse, h_fine = err("heun", 33), err("heun", 65)
    assert 3.4 < h_coarse / h_fine < 4.6, (h_coarse, h_fine)  # second order
    assert h_fine < 1e-3
    # the model-level sampler is solve_ode of the labelled model on ode_grid
    y = torch.full((256,), g.null_class)
    sampled = flow_matching_sample(g, z, y, num_points=65, t_end=0.0, method="heun")
    assert float((sampled - exact).abs().max()) == pytest.approx(h_fine, rel=1e-9)
    # the oracle's RK4 integrator matches the closed form
    torch.testing.assert_close(g.flow(z, 1.0, 0.0, num_steps=100), exact, atol=1e-8, rtol=0)


def test_solve_ode_rejects_bad_grids():
    with pytest.raises(ValueError, match="strictly decreasing"):
        solve_ode(lambda z, t: z, torch.zeros(1, 2), [0.0, 1.0])
    with pytest.raises(ValueError, match="unknown ODE method"):
        solve_ode(lambda z, t: z, torch.zeros(1, 2), [1.0, 0.0], "rk45")
    with pytest.raises(ValueError, match="at least 2"):
        ode_grid(1)


# ----------------------------------------------------------------------------------- guidance


class LabelVelocity(torch.nn.Module):
    """v(z, t, y) = z * 0 + y (per-row constant), with a call counter."""

    null_class = 9

    def __init__(self, offset: float = 0.0):
        super().__init__()
        self.offset, self.calls = offset, []

    def forward(self, z, t, y):
        self.calls.append(z.shape[0])
        return torch.zeros_like(z) + y.to(z.dtype)[:, None] + self.offset


def test_classifier_free_guidance_formula_and_interval():
    model = LabelVelocity()
    y = torch.tensor([2, 5])
    z = torch.zeros(2, 3)
    v = cfg_velocity_fn(model, y, scale=3.0, interval=(0.2, 0.6))
    inside = v(z, torch.tensor([0.2, 0.6]))  # inclusive bounds
    # v_null + w (v_cond - v_null) with v_null = 9
    torch.testing.assert_close(inside[:, 0], torch.tensor([9 + 3 * (2 - 9.0), 9 + 3 * (5 - 9.0)]))
    assert model.calls[-1] == 4  # one doubled batch [z; z]
    outside = v(z, torch.tensor([0.1, 0.9]))
    torch.testing.assert_close(outside[:, 0], torch.tensor([2.0, 5.0]))
    mixed = v(z, torch.tensor([0.5, 0.9]))
    torch.testing.assert_close(mixed[:, 0], torch.tensor([9 + 3 * (2 - 9.0), 5.0]))
    # scale 1 is the labelled model itself, one call of B rows
    model.calls.clear()
    plain = cfg_velocity_fn(model, y, 1.0)(z, torch.tensor([0.5, 0.5]))
    assert model.calls == [2]
    torch.testing.assert_close(plain, labelled_velocity_fn(model, y)(z, torch.tensor([0.5, 0.5])))
    torch.testing.assert_close(plain[:, 0], torch.tensor([2.0, 5.0]))


def test_autoguidance_formula():
    main, weak = LabelVelocity(0.0), LabelVelocity(1.0)
    y = torch.tensor([2, 5])
    velocity = autoguidance_velocity_fn(main, weak, y, scale=1.5, interval=(0.0, 0.5))
    v = velocity(torch.zeros(2, 1), torch.tensor([0.3, 0.7]))
    # row 0: weak + 1.5 (main - weak) = 3 + 1.5 * (2 - 3); row 1 outside the interval: main = 5
    torch.testing.assert_close(v[:, 0], torch.tensor([3 + 1.5 * (2 - 3.0), 5.0]))
    with pytest.raises(ValueError, match="either"):
        flow_matching_sample(main, torch.zeros(2, 1), y, cfg_scale=2.0, weak_model=weak)


# ----------------------------------------------------------------------------------- MeanFlow sampling


def test_meanflow_grid_and_sampler_with_the_exact_average_velocity():
    assert meanflow_grid(1).tolist() == [1.0, 0.0]
    assert meanflow_grid(2).tolist() == [1.0, 0.5, 0.0]
    g = single_gaussian()
    oracle = MixtureOracle(g, num_steps=100)
    torch.manual_seed(0)
    e = torch.randn(64, 2, dtype=torch.float64)
    y = torch.full((64,), g.null_class)
    exact = gaussian_flow(e, 1.0, 0.0, g.means[0], g.std)
    # with the true h every jump is exact, whatever the grid
    for steps in (1, 2, [1.0, 0.7, 0.2, 0.0]):
        out, traj = meanflow_sample(oracle, e, y, steps, return_trajectory=True)
        torch.testing.assert_close(out, exact, atol=1e-7, rtol=0)
    torch.testing.assert_close(traj[2], gaussian_flow(e, 1.0, 0.2, g.means[0], g.std), atol=1e-7, rtol=0)

    calls = []

    def recording(z, t, y, r=None):
        calls.append((float(t[0]), float(r[0])))
        return torch.zeros_like(z)

    meanflow_sample(recording, e, y, 2)
    assert calls == [(1.0, 0.5), (0.5, 0.0)]
    with pytest.raises(ValueError, match="strictly decreasing"):
        meanflow_sample(recording, e, y, [1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="at least one step"):
        meanflow_sample(recording, e, y, 0)
