"""Objectives (FM, CMT, MeanFlow) against closed forms: the exact average velocity of a Gaussian mixture is a
fixed point of the MeanFlow target, CMT targets along exact trajectories are that same h, FM's minimum is
known in closed form, and the 2511.19065 weights have the stated means."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import integrate

from mfrae.flow.objectives import (
    CMTLoss,
    FlowMatchingLoss,
    ImprovedSchedule,
    MeanFlowLoss,
    TrainingGuidance,
    adaptive_weighting,
    drop_labels,
    finite_difference_derivative,
    jvp_with_primal,
    meanflow_target,
    mixed_velocity,
    trajectory_pairs,
)
from mfrae.flow.paths import PairSampler, TimeDistribution, interpolate, one_point_velocity
from mfrae.flow.samplers import ode_grid
from mfrae.flow.toy import GaussianMixture, MixtureOracle, ToyMeanFlowNet
from mfrae.models.dit_dh import DiTDH, DiTDHConfig

UNIFORM = TimeDistribution.uniform()

# torch.func.jvp loads its decompositions with torch.jit.script on first use (torch-internal deprecation).
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"), pytest.mark.usefixtures("one_thread")]


def tiny_dit(seed: int = 0) -> DiTDH:
    """Tiny MeanFlow DiT^DH with the zero-initialised adaLN / output layers randomised (else u = 0, du/dt = 0)."""
    torch.manual_seed(seed)
    model = DiTDH(DiTDHConfig(input_size=4, in_channels=8, hidden_size=(32, 48), depth=(2, 1), num_heads=(2, 2),
                              num_classes=10, interval_embedding=True))
    for block in model.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.05)
    for layer in (model.final_layer.adaLN_modulation[-1], model.final_layer.linear):
        torch.nn.init.normal_(layer.weight, std=0.05)
    return model


class Recorder(torch.nn.Module):
    """Wraps a model and records (t, r, y, grad enabled, training) of every call."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.calls: list[dict] = []

    @property
    def null_class(self):
        return self.model.null_class

    def forward(self, z, t, y, r=None):
        self.calls.append(dict(n=z.shape[0], t=t.clone(), r=None if r is None else r.clone(), y=y.clone(),
                               grad=torch.is_grad_enabled(), training=self.training))
        return self.model(z, t, y) if r is None else self.model(z, t, y, r=r)


class RecordingTeacher(Recorder):
    def forward(self, z, t, y, r=None):
        assert r is None
        return super().forward(z, t, y)


# ----------------------------------------------------------------------------------- (1) MeanFlow identity


@pytest.mark.parametrize("derivative", ["finite_difference", "jvp", "finite_difference_fused"])
def test_oracle_average_velocity_is_a_fixed_point_of_the_mfd_target(mixture, derivative):
    """u_tgt = v - (t - r) dh/dt equals h itself when u = h and v is the exact velocity (MeanFlow identity)."""
    torch.manual_seed(0)
    oracle = MixtureOracle(mixture, num_steps=60)
    loss_fn = MeanFlowLoss(mixture, time=UNIFORM, fraction_r_neq_t=0.75, derivative=derivative, label_dropout=0.0)
    n = 128
    x = mixture.sample(n).double()
    e = torch.randn_like(x)
    t, r = loss_fn.pairs.sample(n)
    y = torch.full((n,), mixture.null_class)
    z = interpolate(x, e, t)
    v = mixed_velocity(one_point_velocity(x, e), loss_fn.teacher_velocity(z, t, y), loss_fn.teacher_mix)
    u, target = loss_fn.prediction_and_target(oracle, z, t, r, y, v)
    gap = r != t
    rel = float((u[gap] - target[gap]).norm() / u[gap].norm())
    # central difference: O(d^2) ~ 1e-4; JVP: exact up to the RK4 error of h
    assert rel < (1e-3 if "finite" in derivative else 1e-6), f"{derivative}: relative error {rel:.2e}"
    # the identity is not trivial: the correction term is of the same size as u
    with torch.no_grad():
        _, dhdt = jvp_with_primal(oracle, z[gap], t[gap], r[gap], y[gap], v[gap])
    correction = (t - r)[gap, None].double() * dhdt
    assert float(correction.norm() / u[gap].norm()) > 0.1
    # and the whole objective gives ~0 loss for the oracle, but not for a perturbed oracle
    torch.manual_seed(1)
    assert float(loss_fn(oracle, x, y).max()) < 1e-3
    perturbed = lambda zz, tt, yy, r=None: oracle(zz, tt, yy, r=r) + 0.3  # noqa: E731
    torch.manual_seed(1)
    assert float(loss_fn(perturbed, x, y).min()) > 0.5


def test_r_equal_t_rows_target_is_w_exactly():
    model = tiny_dit()
    torch.manual_seed(0)
    z, w = torch.randn(6, 8, 4, 4), torch.randn(6, 8, 4, 4)
    t = torch.rand(6)
    r = torch.where(torch.arange(6) % 2 == 0, t, t * 0.5)
    y = torch.randint(0, 10, (6,))
    for derivative in ("finite_difference", "jvp", "finite_difference_fused"):
        loss_fn = MeanFlowLoss(time=UNIFORM, derivative=derivative, null_class=10)
        u, target = loss_fn.prediction_and_target(model, z, t, r, y, w)
        assert torch.equal(target[0::2], w[0::2]), derivative
        assert not torch.equal(target[1::2], w[1::2]), derivative
        assert u.requires_grad and not target.requires_grad
        # all rows r = t, and all rows r != t
        u_eq, target_eq = loss_fn.prediction_and_target(model, z, t, t, y, w)
        assert torch.equal(target_eq, w)
        torch.testing.assert_close(u_eq, model(z, t, y), atol=2e-5, rtol=1e-4)
        u_gap, _ = loss_fn.prediction_and_target(model, z, t, t * 0.3, y, w)
        torch.testing.assert_close(u_gap, model(z, t, y, r=t * 0.3), atol=2e-5, rtol=1e-4)


def test_meanflow_target_is_the_meanflow_identity():
    """u = v - (t - r) du/dt for two average-velocity fields known in closed form, so meanflow_target(v, du/dt)
    returns u itself (and carries no gradient)."""
    torch.manual_seed(0)
    n = 64
    t = torch.rand(n, dtype=torch.float64)
    r = t * torch.rand(n, dtype=torch.float64)
    h = (t - r)[:, None]
    # (a) z-independent velocity v(t) = a + 2 b t: u(r, t) = a + b (t + r), du/dt = b (r fixed)
    a, b = torch.randn(n, 3, dtype=torch.float64), torch.randn(n, 3, dtype=torch.float64)
    v, u = a + 2 * b * t[:, None], a + b * (t + r)[:, None]
    torch.testing.assert_close(meanflow_target(v, b, t, r), u, rtol=1e-12, atol=1e-12)
    # (b) the linear ODE dz/dt = k z: z_r = z_t exp(-k (t - r)), so u = z g(t - r), g(h) = (1 - exp(-k h)) / h, and
    # du/dt along (dz, dr, dt) = (k z, 0, 1) is k z g + z g'(h), with h g'(h) = k exp(-k h) - g(h)
    k = 1.7
    z = torch.randn(n, 3, dtype=torch.float64, requires_grad=True)
    g = (1 - torch.exp(-k * h)) / h
    dg = (k * torch.exp(-k * h) - g) / h
    target = meanflow_target(k * z, k * z * g + z * dg, t, r)
    torch.testing.assert_close(target, z * g, rtol=1e-12, atol=1e-12)
    assert not target.requires_grad  # stop-gradient
    # at r = t the correction vanishes: the target is the velocity
    assert torch.equal(meanflow_target(v, b, t, t), v)


def test_mixed_velocity_interpolates_between_the_one_point_and_the_teacher_velocity():
    one_point, teacher = torch.randn(4, 3), torch.randn(4, 3)
    assert mixed_velocity(one_point, None, 0.0) is one_point  # MFT: the teacher is not needed
    assert mixed_velocity(one_point, teacher, 1.0) is teacher  # MFD
    torch.testing.assert_close(mixed_velocity(one_point, teacher, 0.25), 0.75 * one_point + 0.25 * teacher)
    # the objective calls its teacher only when the mix needs it
    teacher_net = RecordingTeacher(ToyMeanFlowNet(num_classes=3, interval_embedding=False))
    z, t, y = torch.randn(4, 2), torch.rand(4), torch.zeros(4, dtype=torch.long)
    assert MeanFlowLoss(teacher_net, teacher_mix=0.0, label_dropout=0.0).teacher_velocity(z, t, y) is None
    assert teacher_net.calls == []
    v = MeanFlowLoss(teacher_net, label_dropout=0.0).teacher_velocity(z, t, y)  # teacher_mix defaults to 1
    torch.testing.assert_close(v, teacher_net.model(z, t, y))


# ----------------------------------------------------------------------------------- (2) FD vs JVP on DiT^DH


def test_finite_difference_matches_jvp_on_dit_dh():
    model = tiny_dit()
    torch.manual_seed(1)
    n = 8
    z, w = torch.randn(n, 8, 4, 4), torch.randn(n, 8, 4, 4)
    t = torch.rand(n) * 0.8 + 0.2
    r = t * torch.rand(n)
    y = torch.randint(0, 11, (n,))
    with torch.no_grad():
        _, exact = jvp_with_primal(model, z, t, r, y, w)
    approx = finite_difference_derivative(model, z, t, r, y, w, 5e-3)
    rel = float((approx - exact).norm() / exact.norm())
    print(f"\nDiT^DH du/dt: relative error finite difference (step 5e-3) vs JVP = {rel:.2e}")
    assert float(exact.norm()) > 1e-2, "derivative is trivially small: the randomised layers did not take"
    assert rel < 1e-2
    # the JVP primal is the prediction, with a working autograd graph equal to a plain forward's gradient
    u, dudt = jvp_with_primal(model, z, t, r, y, w)
    assert not dudt.requires_grad
    torch.testing.assert_close(u, model(z, t, y, r=r), atol=1e-5, rtol=1e-4)
    u.square().sum().backward()
    g_jvp = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    model(z, t, y, r=r).square().sum().backward()
    g_plain = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    for a, b in zip(g_jvp, g_plain):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    # the whole objective agrees across derivative modes (same draws)
    losses = {}
    for derivative in ("finite_difference", "jvp", "finite_difference_fused"):
        torch.manual_seed(3)
        losses[derivative] = MeanFlowLoss(time=UNIFORM, fraction_r_neq_t=0.5, derivative=derivative,
                                          null_class=10)(model, z, y)
    torch.testing.assert_close(losses["finite_difference"], losses["finite_difference_fused"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(losses["finite_difference"], losses["jvp"], atol=1e-3, rtol=2e-2)


def test_finite_difference_runs_without_autograd_and_teacher_is_frozen():
    student = Recorder(ToyMeanFlowNet(num_classes=3))
    teacher = RecordingTeacher(ToyMeanFlowNet(num_classes=3, interval_embedding=False)).train()
    loss_fn = MeanFlowLoss(teacher, time=UNIFORM, fraction_r_neq_t=0.5, label_dropout=0.0)
    assert not teacher.training  # put in eval mode at construction
    teacher.train()
    torch.manual_seed(0)
    loss_fn(student, torch.randn(64, 2), torch.zeros(64, dtype=torch.long)).mean().backward()
    main, stencil = student.calls
    assert main["grad"] and main["n"] == 64
    assert not stencil["grad"] and stencil["n"] == 2 * int((main["r"] != main["t"]).sum())
    (teacher_call,) = teacher.calls
    assert not teacher_call["grad"] and not teacher_call["training"]


# ----------------------------------------------------------------------------------- label dropout


def test_label_dropout_happens_once_per_sample():
    student = Recorder(ToyMeanFlowNet(num_classes=10))
    teacher = RecordingTeacher(ToyMeanFlowNet(num_classes=10, interval_embedding=False))
    loss_fn = MeanFlowLoss(teacher, time=UNIFORM, fraction_r_neq_t=0.5, label_dropout=0.1, null_class=10)
    n = 20_000
    torch.manual_seed(0)
    y = torch.randint(0, 10, (n,))
    with torch.no_grad():
        loss_fn(student, torch.randn(n, 2), y)
    main, stencil = student.calls
    y_seen = main["y"]
    dropped = y_seen == 10
    assert torch.equal(y_seen[~dropped], y[~dropped])
    rate = float(dropped.float().mean())
    # one Bernoulli(0.1) per sample: 0.1 +- 4 sigma; dropping twice would give 0.19
    assert abs(rate - 0.1) < 4 * math.sqrt(0.09 / n), rate
    gap = main["r"] != main["t"]
    assert torch.equal(stencil["y"], torch.cat([y_seen[gap], y_seen[gap]]))  # the stencil sees the same labels
    assert torch.equal(teacher.calls[0]["y"], y_seen)  # and so does the teacher
    # the same holds for the other objectives
    for objective in (FlowMatchingLoss(label_dropout=0.1, null_class=10),
                      CMTLoss(teacher, label_dropout=0.1, pairs_per_trajectory=2, null_class=10)):
        rec = Recorder(ToyMeanFlowNet(num_classes=10, interval_embedding=isinstance(objective, CMTLoss)))
        with torch.no_grad():
            objective(rec, torch.randn(4000, 2), torch.randint(0, 10, (4000,)))
        assert abs(float((rec.calls[0]["y"] == 10).float().mean()) - 0.1) < 4 * math.sqrt(0.09 / rec.calls[0]["n"])
    assert torch.equal(drop_labels(y, 0.0, 10), y)
    with pytest.raises(ValueError, match="dropout"):
        drop_labels(y, 1.5, 10)


# ----------------------------------------------------------------------------------- adaptive weight


def test_adaptive_weighting_values_and_gradients():
    sq = torch.tensor([0.5, 2.0, 10.0], requires_grad=True)
    out = adaptive_weighting(sq, p=1.0, c=0.01)
    torch.testing.assert_close(out.detach(), sq.detach() / (sq.detach() + 0.01))
    out.sum().backward()
    torch.testing.assert_close(sq.grad, 1 / (sq.detach() + 0.01))  # the weight is stop-gradient
    sq.grad = None
    adaptive_weighting(sq, p=1.0, c=1e-3, squared=True).sum().backward()
    torch.testing.assert_close(sq.grad, 2 * sq.detach() / (sq.detach() ** 2 + 1e-3))  # official variant: ~2 / L
    assert torch.equal(adaptive_weighting(sq, p=0.0), sq)
    with pytest.raises(ValueError):
        adaptive_weighting(sq, p=-1.0)


# ----------------------------------------------------------------------------------- guidance in training


def test_training_guidance_target():
    class Const(torch.nn.Module):
        null_class = 5

        def forward(self, z, t, y, r=None):  # u(z, t, t | y) = y
            return torch.zeros_like(z) + y.to(z.dtype)[:, None]

    net = Const()
    g = TrainingGuidance(omega=0.2, kappa=0.9 - 0.2 + 0.0, t_min=0.0, t_max=0.5)
    loss_fn = MeanFlowLoss(time=UNIFORM, guidance=g, null_class=Const.null_class)
    w = torch.full((4, 2), 3.0)
    t = torch.tensor([0.1, 0.5, 0.9, 0.3])
    y = torch.tensor([2, 2, 2, 5])  # last row dropped to the null class
    out = loss_fn.guided_velocity(net, w, torch.zeros(4, 2), t, y)
    expected_inside = 0.2 * 3.0 + 0.7 * 2.0 + (1 - 0.2 - 0.7) * 5.0
    torch.testing.assert_close(out[:, 0], torch.tensor([expected_inside, expected_inside, 3.0, 3.0]))
    with pytest.raises(ValueError, match="kappa"):
        TrainingGuidance(kappa=1.0)
    with pytest.raises(ValueError, match="teacher"):
        MeanFlowLoss(guidance=TrainingGuidance(source="teacher"))


# ----------------------------------------------------------------------------------- 2511.19065 schedule


def test_progressive_weights_average_to_one_and_end_at_one():
    schedule = ImprovedSchedule(total_steps=1000, alpha="min_snr")
    loss_fn = MeanFlowLoss(time=TimeDistribution.logit_normal(-0.4, 1.0), schedule=schedule, label_dropout=0.0)
    # lambda = 1 / E[1 - dt] = 1 / (1 - 0.2333) under MeanFlow's pair sampler (arXiv 2511.19065 quotes 1.3046)
    assert loss_fn.beta_scale == pytest.approx(1.3046, abs=1e-3)
    torch.manual_seed(0)
    t, r = loss_fn.pairs.sample(400_000)
    gap = r != t
    w0 = loss_fn.row_weights(t, r, step=0)
    assert float(w0[gap].mean()) == pytest.approx(1.0, abs=0.005)  # beta at s = 1
    assert float(w0[~gap].mean()) == pytest.approx(1.0, abs=0.005)  # alpha normalised over the r = t rows
    # at s = 1, beta = lambda (1 - dt): 0 for dt = 1, lambda for dt -> 0
    torch.testing.assert_close(w0[gap], loss_fn.beta_scale * (1 - (t - r)[gap]))
    w_end = loss_fn.row_weights(t, r, step=1000)
    assert torch.equal(w_end[gap], torch.ones(int(gap.sum())))
    assert torch.equal(loss_fn.row_weights(t, r, step=5000), w_end)  # clamped past the horizon
    assert schedule.progress(0) == 1.0 and schedule.progress(500) == pytest.approx(0.5)
    assert ImprovedSchedule(1000, k=2.0).progress(500) == pytest.approx(0.75)
    # with the shift the calibration follows the shifted distribution
    shifted = MeanFlowLoss(time=TimeDistribution.logit_normal(-0.4, 1.0), shift=math.sqrt(48), schedule=schedule,
                           label_dropout=0.0)
    t, r = shifted.pairs.sample(400_000)
    w_shifted = shifted.row_weights(t, r, 0)
    assert float(w_shifted[r != t].mean()) == pytest.approx(1.0, abs=0.005)
    assert float(w_shifted[r == t].mean()) == pytest.approx(1.0, abs=0.005)
    # alpha: MinSNR-5 at the unshifted time's SNR, largest where a (1 - t) = sqrt(5) t
    a = math.sqrt(48)
    t_peak = torch.tensor([a / (a + math.sqrt(5))])
    peak = float(shifted.row_weights(t_peak, t_peak, 0)) * shifted.alpha_norm
    assert peak == pytest.approx(5 * float(t_peak) ** 2, rel=1e-5)
    with pytest.raises(ValueError, match="total_steps"):
        ImprovedSchedule(total_steps=0)


def test_schedule_weights_are_applied_after_adaptive_normalisation():
    net = ToyMeanFlowNet(num_classes=1)
    x, y = torch.randn(512, 2), torch.zeros(512, dtype=torch.long)
    plain = MeanFlowLoss(time=UNIFORM, fraction_r_neq_t=0.5, label_dropout=0.0)
    weighted = MeanFlowLoss(time=UNIFORM, fraction_r_neq_t=0.5, label_dropout=0.0, schedule=ImprovedSchedule(100))
    torch.manual_seed(0)
    base = plain(net, x, y)
    torch.manual_seed(0)
    t, r = plain.pairs.sample(512)  # the same draws the objective makes (no label dropout)
    torch.manual_seed(0)
    out = weighted(net, x, y, step=10)
    torch.testing.assert_close(out, base * weighted.row_weights(t, r, 10))
    assert float(base.detach().max()) <= 1.0  # normalised losses L / (L + c) < 1: the weights sit outside


# ----------------------------------------------------------------------------------- (4) CMT


def test_cmt_targets_equal_h_along_exact_trajectories(mixture):
    torch.manual_seed(0)
    grid = ode_grid(16, 2.0, 0.001)
    e = torch.randn(32, 2, dtype=torch.float64)
    states = [e]
    for t_cur, t_next in zip(grid[:-1].tolist(), grid[1:].tolist()):
        states.append(mixture.flow(states[-1], t_cur, t_next, num_steps=40))  # exact (RK4) trajectory
    states = torch.stack(states)
    y = torch.full((32,), mixture.null_class)
    pairs = trajectory_pairs(states, grid, y, num_pairs=400)
    assert bool(torch.all(pairs.r < pairs.t))
    grid32 = grid.float()
    assert bool(torch.isin(pairs.t, grid32).all() and torch.isin(pairs.r, grid32).all())
    h = mixture.average_velocity(pairs.z, pairs.r.double(), pairs.t.double(), pairs.y, num_steps=200)
    torch.testing.assert_close(pairs.target, h, atol=1e-5, rtol=1e-5)
    # all K (K - 1) / 2 = 120 (i < j) pairs are reachable
    many = trajectory_pairs(states[:, :1], grid, y[:1], num_pairs=20_000)
    assert len({(a, b) for a, b in zip(many.t.tolist(), many.r.tolist())}) == 120


def test_cmt_loss_uses_euler_teacher_trajectories_and_labels(mixture):
    loss_fn = CMTLoss(mixture, grid_points=16, shift=2.0, label_dropout=0.0)
    torch.manual_seed(0)
    e = torch.randn(8, 2)
    y = torch.full((8,), mixture.null_class)
    states = loss_fn.trajectory(e, y)
    grid = ode_grid(16, 2.0, 0.001).tolist()
    z = e.double()
    for k in range(15):  # Euler, written out
        z = z + (grid[k + 1] - grid[k]) * mixture.velocity(z, grid[k])
        torch.testing.assert_close(states[k + 1].double(), z, atol=1e-5, rtol=1e-5)
    # nominal labelling (official QUIRK): state k is labelled 1 - k/15, the target divided by the nominal gap
    nominal = CMTLoss(mixture, shift=2.0, time_labels="nominal", label_dropout=0.0, pairs_per_trajectory=50)
    torch.manual_seed(1)
    p = nominal.pairs(torch.zeros(4, 2), y[:4])
    k_t, k_r = torch.round((1 - p.t.double()) * 15), torch.round((1 - p.r.double()) * 15)
    torch.testing.assert_close(p.t.double(), 1 - k_t / 15, atol=1e-7, rtol=0)
    assert bool(torch.all(k_r > k_t))
    # per-pair loss: [P] = B x pairs_per_trajectory values
    out = loss_fn(ToyMeanFlowNet(num_classes=6), torch.zeros(8, 2), y)
    assert out.shape == (8 * 64,)
    with pytest.raises(ValueError, match="time_labels"):
        CMTLoss(mixture, time_labels="both")


# ----------------------------------------------------------------------------------- flow matching


def test_flow_matching_loss_of_the_exact_velocity_is_the_closed_form_minimum():
    """Single Gaussian N(m, s^2 I): Var(e - x | z_t) = s^2 / ((1 - t)^2 s^2 + t^2) per dimension, so the FM
    minimum over t ~ U[0, 1] is int_0^1 s^2 / ((1 - t)^2 s^2 + t^2) dt, attained by the exact velocity."""
    s = 0.5
    g = GaussianMixture(torch.tensor([[1.0, -0.5, 0.25]], dtype=torch.float64), s)
    exact_net = lambda z, t, y: g.velocity(z.double(), t)  # noqa: E731
    minimum, _ = integrate.quad(lambda t: s * s / ((1 - t) ** 2 * s * s + t * t), 0.0, 1.0)
    loss_fn = FlowMatchingLoss(time=UNIFORM, label_dropout=0.0)
    n = 400_000
    x = g.sample(n).double()
    y = torch.zeros(n, dtype=torch.long)
    torch.manual_seed(0)
    loss = loss_fn(exact_net, x, y)
    assert float(loss.mean()) == pytest.approx(minimum, rel=0.01)
    # any other field is worse by exactly its mean squared distance (the cross term vanishes)
    torch.manual_seed(0)
    shifted = loss_fn(lambda z, t, y: exact_net(z, t, y) + 0.3, x, y)
    assert float(shifted.mean() - loss.mean()) == pytest.approx(0.09, abs=0.005)


def test_objectives_reject_bad_options(mixture):
    with pytest.raises(ValueError, match="no teacher"):
        MeanFlowLoss(teacher_mix=0.5)
    with pytest.raises(ValueError, match="derivative"):
        MeanFlowLoss(derivative="forward")
    with pytest.raises(ValueError, match="teacher_mix"):
        MeanFlowLoss(mixture, teacher_mix=1.5)
    with pytest.raises(ValueError, match="shape"):
        MeanFlowLoss(label_dropout=0.0)(ToyMeanFlowNet(), torch.randn(4, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        FlowMatchingLoss(reduction="max")
    with pytest.raises(ValueError, match="step"):
        finite_difference_derivative(ToyMeanFlowNet(), torch.randn(2, 2), torch.rand(2), torch.rand(2),
                                     torch.zeros(2, dtype=torch.long), torch.randn(2, 2), step=0.0)
    with pytest.raises(ValueError, match="fd_step"):
        MeanFlowLoss(fd_step=0.0, label_dropout=0.0)
    assert isinstance(MeanFlowLoss(mixture, null_class=mixture.null_class).pairs, PairSampler)


def test_the_null_class_is_given_at_construction_when_labels_are_dropped_or_guided(mixture):
    """Label dropout and guidance need the null label; the objectives take it at construction, not from the net."""
    for make in (lambda **kw: FlowMatchingLoss(**kw), lambda **kw: CMTLoss(mixture, **kw),
                 lambda **kw: MeanFlowLoss(**kw)):
        with pytest.raises(ValueError, match="null_class"):
            make()  # label_dropout = 0.1 by default
        with pytest.raises(ValueError, match="non-negative integer"):
            make(null_class=-1)
        assert make(label_dropout=0.0).null_class is None
        assert make(null_class=3).null_class == 3
    with pytest.raises(ValueError, match="guidance"):
        MeanFlowLoss(label_dropout=0.0, guidance=TrainingGuidance())
    # the objective drops to its own null class, whatever the net is
    rec = Recorder(ToyMeanFlowNet(num_classes=10, interval_embedding=False))
    torch.manual_seed(0)
    with torch.no_grad():
        FlowMatchingLoss(label_dropout=1.0, null_class=7)(rec, torch.randn(16, 2), torch.zeros(16, dtype=torch.long))
    assert torch.equal(rec.calls[0]["y"], torch.full((16,), 7))


def test_unweighted_meanflow_error_is_the_plain_mse_per_row_kind():
    """Closed form: rows with r = t and r != t averaged separately; an absent row kind is NaN."""
    import math

    from mfrae.flow.objectives import unweighted_meanflow_error

    sq = torch.stack([torch.full((2, 3), v) for v in (1.0, 2.0, 3.0, 6.0)])  # per-row MSE 1, 2, 3, 6
    t = torch.tensor([0.5, 0.5, 0.9, 0.9])
    r = torch.tensor([0.5, 0.1, 0.9, 0.2])
    stats = unweighted_meanflow_error(sq, t, r)
    assert float(stats["mse"]) == 3.0
    assert float(stats["mse_r_eq_t"]) == 2.0  # rows 0 and 2
    assert float(stats["mse_r_neq_t"]) == 4.0  # rows 1 and 3
    assert math.isnan(float(unweighted_meanflow_error(sq, t, t)["mse_r_neq_t"]))


def test_meanflow_loss_records_the_unweighted_error_of_its_last_call():
    from mfrae.flow.objectives import MeanFlowLoss

    def u(z, t, y, r=None):
        return torch.zeros_like(z)

    loss = MeanFlowLoss(fraction_r_neq_t=0.5, label_dropout=0.0, adaptive_p=0.0)
    x = torch.randn(8, 2, 2, 2)
    per_sample = loss(u, x, torch.zeros(8, dtype=torch.long))
    # with u = 0 and p = 0 the loss is the summed squared target, i.e. mse * D per row
    assert torch.allclose(per_sample.mean() / 8, loss.last_stats["mse"], rtol=1e-5)
