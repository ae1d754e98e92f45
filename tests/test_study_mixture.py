"""The mixture testbed of `mfrae study`: mixtures with per-component stds against independent truth (the score
identity, sample moments, an independent ODE integration of the oracle map), the verdict rules on hand-made
numbers, and the study end to end at a tiny size (the CLI's --fast in the slow suite)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from mfrae.cli import main
from mfrae.flow.toy import GaussianMixture
from mfrae.study_mixture import (
    CLAIMS,
    METHODS,
    ORACLE_POINTS,
    MixtureSettings,
    mixture_2d,
    mixture_high_dim,
    oracle_points,
    run_mixture_study,
    separated,
    steps_to_reach,
    verdict_mixtures,
    verdict_signal,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def per_dim_mixture() -> GaussianMixture:
    gen = torch.Generator().manual_seed(3)
    means = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    stds = 0.1 + 0.6 * torch.rand(4, 3, generator=gen, dtype=torch.float64)
    return GaussianMixture(means, stds, torch.tensor([1.0, 2.0, 0.5, 1.5]))


# ----------------------------------------------------------------------------------- the mixture


@pytest.mark.parametrize("make", [per_dim_mixture, mixture_2d], ids=["per-dimension stds", "per-component stds"])
def test_velocity_with_unequal_stds_matches_the_score_identity(make):
    """v(z, t) = E[e - x | z_t = z] = -(z + t grad log p_t(z)) / (1 - t) on the linear path (Tweedie), where
    log p_t is computed independently as the log of the mixture of Gaussians N((1 - t) m_k, var_k(t))."""
    mixture = make()
    torch.manual_seed(0)
    z = (1.5 * torch.randn(200, mixture.dim, dtype=torch.float64)).requires_grad_(True)
    for t in (0.05, 0.4, 0.9):
        var = (1 - t) ** 2 * mixture.stds**2 + t**2  # [K, D]
        comp = torch.distributions.Independent(torch.distributions.Normal((1 - t) * mixture.means, var.sqrt()), 1)
        log_p = torch.logsumexp(comp.log_prob(z[:, None, :]) + mixture.weights.log(), dim=1)
        torch.testing.assert_close(mixture.log_prob(z, t), log_p, atol=1e-10, rtol=1e-10)
        score = torch.autograd.grad(log_p.sum(), z)[0]
        expected = -(z.detach() + t * score) / (1 - t)
        torch.testing.assert_close(mixture.velocity(z.detach(), t), expected, atol=1e-9, rtol=1e-9)


def test_samples_have_the_mixture_moments():
    mixture = per_dim_mixture()
    x = mixture.sample(200_000, torch.Generator().manual_seed(1)).double()
    mean = mixture.weights @ mixture.means
    second = mixture.weights @ (mixture.stds**2 + mixture.means**2)
    torch.testing.assert_close(x.mean(0), mean, atol=0.01, rtol=0)
    torch.testing.assert_close((x**2).mean(0), second, atol=0.02, rtol=0)


def test_shared_std_is_refused_when_stds_differ():
    assert GaussianMixture(torch.zeros(2, 2), 0.3).std == pytest.approx(0.3)
    with pytest.raises(ValueError, match="per-component stds"):
        _ = mixture_2d().std
    with pytest.raises(ValueError, match="does not fit"):
        GaussianMixture(torch.zeros(2, 3), torch.ones(2, 2))


@pytest.mark.parametrize("make", [mixture_2d, lambda: mixture_high_dim(8, 4)], ids=["2d", "8d"])
def test_oracle_points_agree_with_an_independent_float64_integration(make):
    """Phi_{1->0}(e) by the library's RK4 against scipy's adaptive DOP853 (rtol 1e-11) on the same velocity."""
    mixture = make()
    e, x = oracle_points(mixture, n=6)
    assert e.shape == x.shape == (6, mixture.dim) and e.dtype == x.dtype == torch.float64
    for i in range(e.shape[0]):
        def rhs(t, z):
            return mixture.velocity(torch.from_numpy(z)[None], t)[0].numpy()

        sol = solve_ivp(rhs, (1.0, 0.0), e[i].numpy(), method="DOP853", rtol=1e-11, atol=1e-12)
        assert sol.success
        np.testing.assert_allclose(x[i].numpy(), sol.y[:, -1], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------- verdict rules


def test_separated_needs_disjoint_seed_ranges():
    assert separated([1.0, 1.1, 1.2], [1.3, 1.4, 1.5]) == 1
    assert separated([1.3, 1.4], [1.0, 1.2]) == -1
    assert separated([1.0, 1.4], [1.2, 1.5]) == 0
    assert separated([1.0, math.nan], [2.0, 3.0]) == 0
    assert steps_to_reach({"100": 0.5, "200": 0.3, "300": 0.2}, 0.3) == 200
    assert steps_to_reach({"100": 0.5}, 0.1) == math.inf


def _bed(cells: dict[tuple[str, str], list[float]], teachers: dict[str, float]) -> dict:
    runs = [{"teacher": t, "method": m, "p": 1.0, "budget": 100, "seed": s, "map_err_1": v, "map_err_2": v}
            for (t, m), values in cells.items() for s, v in enumerate(values)]
    return {"teachers": [{"name": n, "map_err_49": e} for n, e in teachers.items()], "runs": runs}


def test_signal_verdict_finds_the_teacher_quality_where_mfd_stops_beating_mft():
    cells = {("good", "mfd"): [0.1, 0.11, 0.12], ("good", "mft"): [0.3, 0.31, 0.29], ("good", "mfd_mft"): [0.2] * 3,
             ("fair", "mfd"): [0.3, 0.2, 0.25], ("fair", "mft"): [0.28, 0.26, 0.27], ("fair", "mfd_mft"): [0.25] * 3,
             ("bad", "mfd"): [0.9, 0.8, 0.85], ("bad", "mft"): [0.3, 0.31, 0.29], ("bad", "mfd_mft"): [0.5] * 3}
    v = verdict_signal(_bed(cells, {"bad": 1.0, "good": 0.01, "fair": 0.1}), 100)
    assert [r["teacher"] for r in v["teachers"]] == ["good", "fair", "bad"]  # ordered by the teacher's quality
    assert [r["mfd_vs_mft"] for r in v["teachers"]] == [1, 0, -1]
    assert [r["mfd_mft_vs_mfd"] for r in v["teachers"]] == [-1, 0, 1]
    assert v["mfd_beats_mft_up_to"] == 0.01 and v["mft_beats_mfd_from"] == 1.0


def test_mixture_verdict_reads_the_order_in_lambda():
    names = ["mft", "mix0.25", "mix0.5", "mix0.75", "mfd"]
    cells = {("t", m): [1.0 - 0.1 * i] * 3 for i, m in enumerate(names)}
    cells |= {("u", m): [v] * 3 for m, v in zip(names, [0.5, 0.4, 0.45, 0.6, 0.7])}
    rows = verdict_mixtures(_bed(cells, {"t": 0.01, "u": 0.5}), 100)
    assert rows[0]["best"] == "mfd" and rows[0]["monotone"] == "decreasing"
    assert rows[1]["best"] == "mix0.25" and rows[1]["monotone"] == "no"


# ----------------------------------------------------------------------------------- end to end

TINY = MixtureSettings(seeds=(0, 1), budgets=(4, 8, 12), cmt_steps=4, learned_teacher_steps=(4, 8, 16),
                       p0_teachers=("exact",), schedule_steps=8, init_steps=8, init_lrs=(1e-3,), curve_every=4,
                       batch_size=16, warmup=2, energy_points=40, high_dim=4, high_components=3,
                       full_teacher_axis=False)


def _check_summary(summary: dict, s: MixtureSettings) -> None:
    assert set(summary["claims"]) == set(CLAIMS)
    for claim in summary["claims"].values():
        assert claim["verdict"] and claim["conditions"] and "nan" not in claim["conditions"].lower()
    assert [b["dim"] for b in summary["testbeds"]] == [2, s.high_dim]
    for bed in summary["testbeds"]:
        k, d = len(bed["mixture"]["weights"]), bed["dim"]
        assert np.array(bed["mixture"]["means"]).shape == np.array(bed["mixture"]["stds"]).shape == (k, d)
        assert np.array(bed["oracle_points"]["e"]).shape == np.array(bed["oracle_points"]["x"]).shape == (ORACLE_POINTS, d)
        assert bed["teachers"][0]["name"] == "exact" and {t["kind"] for t in bed["teachers"]} == {"exact", "biased", "learned"}
        assert all(math.isfinite(t["map_err_49"]) for t in bed["teachers"])
        cells = {(r["teacher"], r["method"], r["p"], r["budget"]) for r in bed["runs"]}
        for t in bed["teachers"]:
            for m in METHODS:
                for budget in s.budgets:
                    assert (t["name"], m, 1.0, budget) in cells
        for r in bed["runs"]:
            assert {"teacher", "method", "p", "budget", "seed", "map_err_1", "map_err_2", "diverged"} <= set(r)
            assert r["diverged"] or math.isfinite(r["map_err_1"]) and math.isfinite(r["map_err_2"])
        assert sorted({r["seed"] for r in bed["runs"]}) == list(s.seeds)
        assert {r["p"] for r in bed["runs"] if r["teacher"] == "exact"} == {0.0, 1.0}


@pytest.mark.slow  # 88 tiny runs, about 30 s of CPU: `make test-all` runs it
def test_the_study_end_to_end_at_a_tiny_size(tmp_path):
    summary = run_mixture_study(tmp_path, TINY, workers=1)
    _check_summary(summary, TINY)
    written = json.loads((tmp_path / "study.json").read_text())
    assert written["testbeds"][0]["oracle_points"]["x"] == summary["testbeds"][0]["oracle_points"]["x"]
    assert (tmp_path / "study.html").is_file() and (tmp_path / "study_mixture2d_samples.png").stat().st_size > 1000
    # a second run reuses every finished run: the same numbers, no training
    again = run_mixture_study(tmp_path, TINY, workers=1)
    assert again["testbeds"][1]["runs"] == summary["testbeds"][1]["runs"]
    assert again["seconds_total"] < summary["seconds_total"]


@pytest.mark.slow  # about a minute on 2 cores: `make test-all` runs it
def test_the_fast_command_with_two_workers(tmp_path):
    from mfrae.study_mixture import FAST

    assert main(["study", "--testbed", "mixture", "--fast", "--out", str(tmp_path), "--workers", "2"]) == 0
    _check_summary(json.loads((tmp_path / "study.json").read_text()), FAST)


def test_bad_workers_is_refused_in_one_line(tmp_path, capsys):
    assert main(["study", "--testbed", "mixture", "--fast", "--out", str(tmp_path / "x"), "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
