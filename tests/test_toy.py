"""The Gaussian-mixture oracle, short training runs that must learn the true average velocity, the
MFT-vs-MFD gradient-variance claim, and the `mfrae toy` command."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from PIL import Image

from mfrae.cli import main as cli_main
from mfrae.flow.objectives import MeanFlowLoss
from mfrae.flow.paths import TimeDistribution
from mfrae.flow.samplers import meanflow_sample
from mfrae.flow.toy import (
    GaussianMixture,
    ToyConfig,
    ToyMeanFlowNet,
    energy_distance,
    evaluate_toy,
    train_toy,
)

# Energy distance between 2000-point samples: the floor (two data samples) is ~1e-3 +- 1e-3; a mixture with
# the right modes but equal weights is ~6e-3 away (checked below), so 4e-3 separates "like the data" from not.
ED_THRESHOLD = 4e-3

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: one thread is faster and steadier


@pytest.fixture(scope="module")
def short_mfd(mixture):
    """A few-second MFD run with the exact teacher (800 steps)."""
    net, losses = train_toy(ToyConfig(objective="mfd", steps=800, seed=0), mixture)
    return net, losses


# ----------------------------------------------------------------------------------- oracle


def test_mixture_velocity_matches_the_score_identity(mixture):
    """v(z, t) = E[e - x | z_t = z] = -(z + t grad log p_t(z)) / (1 - t) on the linear path (Tweedie)."""
    torch.manual_seed(0)
    z = (2 * torch.randn(300, 2, dtype=torch.float64)).requires_grad_(True)
    for t in (0.05, 0.3, 0.7, 0.95):
        score = torch.autograd.grad(mixture.log_prob(z, t).sum(), z)[0]
        expected = -(z.detach() + t * score) / (1 - t)
        torch.testing.assert_close(mixture.velocity(z.detach(), t), expected, atol=1e-9, rtol=1e-9)
    # class-conditional velocity = velocity of that component alone
    y = torch.full((300,), 2)
    single = GaussianMixture(mixture.means[2:3], mixture.std)
    torch.testing.assert_close(mixture.velocity(z.detach(), 0.4, y), single.velocity(z.detach(), 0.4))


def test_oracle_one_step_map_transports_noise_to_data(mixture):
    gen = torch.Generator().manual_seed(0)
    e = torch.randn(2000, 2, generator=gen)
    y = torch.full((2000,), mixture.null_class)
    x_hat = e - mixture.average_velocity(e, 0.0, 1.0, y)
    data, other = mixture.sample(2000, gen), mixture.sample(2000, gen)
    assert energy_distance(x_hat, data) < ED_THRESHOLD
    assert abs(energy_distance(other, data)) < ED_THRESHOLD
    # the threshold is tight enough to see wrong mode weights
    equal_weights = GaussianMixture(mixture.means, mixture.std)
    assert energy_distance(equal_weights.sample(2000, gen), data) > ED_THRESHOLD


def test_energy_distance_properties():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1500, 2, generator=gen), torch.randn(1500, 2, generator=gen)
    assert abs(energy_distance(a, b)) < 3e-3
    assert energy_distance(a, b + 0.5) > 0.1
    assert energy_distance(a, b + 0.5) == pytest.approx(energy_distance(b + 0.5, a))
    with pytest.raises(ValueError, match="at least 2"):
        energy_distance(a[:1], b)


# ----------------------------------------------------------------------------------- (3) MFD learns h


def test_short_mfd_run_learns_the_average_velocity(mixture, short_mfd):
    net, losses = short_mfd
    metrics = evaluate_toy(net, mixture, num_samples=2000)
    print(f"\nshort MFD (800 steps): {metrics}")
    assert sum(losses[-50:]) < sum(losses[:50])
    # the trivial one-Euler-step answer u = v(e, 1) is ~0.8 off; an untrained net ~1
    assert metrics["mean_flow_error"] < 0.35
    assert metrics["energy_distance_1step"] < ED_THRESHOLD
    assert metrics["energy_distance_2step"] < ED_THRESHOLD
    untrained = evaluate_toy(ToyMeanFlowNet(num_classes=mixture.num_components, num_frequencies=1), mixture, 500)
    assert untrained["mean_flow_error"] > 0.8 and untrained["energy_distance_1step"] > 0.03


def test_mft_gradient_variance_exceeds_mfd_at_the_same_parameters(mixture, short_mfd):
    """The one-point velocity e - x is an unbiased but noisy stand-in for v: same expected target, more variance."""
    net = copy.deepcopy(short_mfd[0]).requires_grad_(True).train()
    common = dict(time=TimeDistribution.logit_normal(-1.0, 1.5), fraction_r_neq_t=0.5, adaptive_p=0.0,
                  label_dropout=0.0)
    objectives = {"mfd": MeanFlowLoss(mixture, **common), "mft": MeanFlowLoss(None, **common)}
    params = [p for p in net.parameters() if p.requires_grad]
    y = torch.full((64,), mixture.null_class)
    variance, mean_grad = {}, {}
    for name, objective in objectives.items():
        torch.manual_seed(0)
        grads = []
        for _ in range(40):
            loss = objective(net, mixture.sample(64), y).mean()
            grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
        grads = torch.stack(grads)
        mean_grad[name] = grads.mean(0)
        variance[name] = float((grads - mean_grad[name]).square().sum(1).mean())
    print(f"\nper-step gradient variance (trace): MFD {variance['mfd']:.3e}, MFT {variance['mft']:.3e}")
    assert variance["mft"] > 3 * variance["mfd"]


@pytest.mark.slow  # 14 s; the MFD toy run stays in the default suite
def test_fm_and_cmt_learn_their_targets(mixture):
    fm, _ = train_toy(ToyConfig(objective="fm", steps=800), mixture)
    cmt, _ = train_toy(ToyConfig(objective="cmt", steps=500, cmt_solver="heun"), mixture)
    fm_metrics = evaluate_toy(fm, mixture, 1000)
    cmt_metrics = evaluate_toy(cmt, mixture, 1000)
    print(f"\nFM: {fm_metrics}\nCMT(heun): {cmt_metrics}")
    assert fm_metrics["energy_distance_ode50"] < ED_THRESHOLD  # FM: the ODE of the learned velocity
    assert fm_metrics["energy_distance_1step"] > 0.1  # one Euler step of a velocity model is not a sampler
    assert cmt_metrics["mean_flow_error"] < 0.45 and cmt_metrics["energy_distance_1step"] < ED_THRESHOLD


@pytest.mark.slow
@pytest.mark.parametrize("derivative", ["finite_difference", "jvp"])
def test_default_mfd_run_reaches_the_target_error(mixture, derivative):
    net, _ = train_toy(ToyConfig(objective="mfd", derivative=derivative), mixture)
    metrics = evaluate_toy(net, mixture)
    assert metrics["mean_flow_error"] <= 0.10, metrics


# ----------------------------------------------------------------------------------- net and CLI


def test_toy_net_convention():
    net = ToyMeanFlowNet(num_classes=3)
    x, t, y = torch.randn(5, 2), torch.rand(5), torch.full((5,), 3)
    torch.testing.assert_close(net(x, t, y), net(x, t, y, r=t))  # r omitted means r = t
    assert not torch.allclose(net(x, t, y, r=t * 0.5), net(x, t, y))
    assert net(x, 0.5, y).shape == (5, 2)  # scalar times broadcast
    assert meanflow_sample(net, x, y, 2).shape == (5, 2)
    with pytest.raises(ValueError, match="without r"):
        ToyMeanFlowNet(interval_embedding=False)(x, t, y, r=t)
    with pytest.raises(ValueError, match="shape"):
        net(torch.randn(5, 3), t, y)


@pytest.mark.parametrize("objective", ["fm", "cmt", "mfd", "mft"])
def test_cli_toy_writes_json_and_picture(tmp_path, capsys, objective):
    code = cli_main(["toy", "--objective", objective, "--steps", "20", "--json", "--out", str(tmp_path)])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    keys = ("mean_flow_error", "energy_distance_1step", "energy_distance_2step", "energy_distance_floor", "seconds")
    for key in keys:
        assert math.isfinite(result[key]), key
    assert result["objective"] == objective
    with Image.open(result["picture"]) as image:
        assert image.size[0] > image.size[1] > 100


def test_cli_toy_bad_input(capsys):
    assert cli_main(["toy", "--steps", "0"]) == 2
    assert "steps" in capsys.readouterr().err
