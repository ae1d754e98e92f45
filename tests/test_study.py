"""`mfrae study --fast` on a fast demo run: every claim gets a row with finite numbers, and the verdict rules
decide as written on hand-made numbers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mfrae.cli import main
from mfrae.study import FAST, CLAIMS, RunResult, separated, steps_to_reach, verdict_guidance, verdict_init, verdict_signal


# The end-to-end study trains about 40 tiny runs on top of a fast demo: kept out of the default run.
@pytest.fixture(scope="module")
def study(fast_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    assert main(["study", "--fast", "--from", str(fast_demo), "--out", str(out)]) == 0
    return out


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.mark.slow
def test_every_claim_has_a_verdict_and_finite_numbers(study):
    summary = json.loads((study / "study.json").read_text())
    assert set(summary["claims"]) == set(CLAIMS)
    for claim in summary["claims"].values():
        assert claim["verdict"] in ("reproduced", "not reproduced", "inconclusive")
        assert "nan" not in claim["detail"].lower()
    runs = summary["runs"]
    for name, seeds in runs.items():
        assert [r["seed"] for r in seeds] == list(FAST.seeds), name
        for r in seeds:
            if not r["diverged"]:
                assert _finite(r["final"]["fd_1step"]) and _finite(r["final"]["fd_2step"]), name
            assert _finite(r["grad_norm_max"]) and _finite(r["seconds_per_step"]), name
    for name in ("mfd", "mft", "jvp"):  # MeanFlow stages log the unweighted MSE per row kind
        for r in runs[name]:
            assert {"mse", "mse_r_eq_t", "mse_r_neq_t"} <= set(r["mse"]), name
            assert all(v >= 0 for v in r["mse"]["mse"].values())
    assert _finite(summary["init"]["fd_1step"])
    for points in summary["quality_against_cost"].values():
        assert all(_finite(p["fd"]) and p["gflops"] > 0 for p in points)


@pytest.mark.slow
def test_report_has_the_figures(study):
    html = (study / "study.html").read_text()
    assert html.count("<img") >= 14
    for name in ("samples", "fd_vs_nfe", "fd_vs_gflops", "init", "schedule", "cmt_budget", "mse"):
        assert (study / f"study_{name}.png").stat().st_size > 1000, name


@pytest.mark.slow
def test_running_again_reuses_every_run(study, fast_demo, capsys):
    before = {p: p.stat().st_mtime for p in (study / "runs").rglob("study_done.json")}
    assert main(["study", "--fast", "--from", str(fast_demo), "--out", str(study)]) == 0
    after = {p: p.stat().st_mtime for p in (study / "runs").rglob("study_done.json")}
    assert before == after


# -- the verdict rules, on numbers made up for them ------------------------------------------------


def _result(name, seed, fd1, fd2=None, grad=1.0, diverged=False, curve=None):
    return RunResult(name, seed, "", 10, diverged, curve or {10: fd1}, {10: fd2 or fd1},
                     {"fd_1step": fd1, "fd_2step": fd2 or fd1, "class_acc_1step": 0.9}, grad, 0.1)


def test_separated_counts_a_difference_only_beyond_the_seed_spread():
    assert separated(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 1
    assert separated(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == -1
    assert separated(np.array([1.0, 3.5]), np.array([3.0, 4.0])) == 0
    assert separated(np.array([1.0, math.nan]), np.array([3.0, 4.0])) == 0


def test_verdict_rules():
    runs = {"mfd": [_result("mfd", s, 40 + s, grad=1.0) for s in (0, 1)],
            "mfd_from_random": [_result("r", s, 300, grad=50.0) for s in (0, 1)],
            "mfd_from_teacher": [_result("t", s, 60, grad=1.0, diverged=s == 1) for s in (0, 1)]}
    assert verdict_init(runs)[0] == "reproduced"
    runs["mfd_from_random"] = [_result("r", s, 300, grad=2.0) for s in (0, 1)]
    runs["mfd_from_teacher"] = [_result("t", s, 60, grad=2.0) for s in (0, 1)]
    assert verdict_init(runs)[0] == "not reproduced"
    runs.update(mft=[_result("mft", s, 50 + s) for s in (0, 1)], mfd_then_mft=[_result("x", s, 30 + s) for s in (0, 1)])
    assert verdict_signal(runs)[0] == "reproduced"
    runs["mfd_then_mft"] = [_result("x", s, 45 + s) for s in (0, 1)]
    assert verdict_signal(runs)[0] == "not reproduced"
    runs["mfd_guided"] = [_result("g", s, 20 + s) for s in (0, 1)]
    assert verdict_guidance(runs)[0] == "not reproduced"  # guidance helped beyond the spread
    runs["mfd_guided"] = [_result("g", s, 40.5 + s) for s in (0, 1)]
    assert verdict_guidance(runs)[0] == "reproduced"


def test_steps_to_reach_reads_the_seed_mean_curve():
    curves = [_result("a", s, 0, curve={10: 50.0 + s, 20: 30.0 + s, 30: 20.0}) for s in (0, 1)]
    assert steps_to_reach(curves, 31.0) == 20
    assert steps_to_reach(curves, 10.0) == math.inf


def test_a_schedule_without_horizon_passes_the_config_check():
    """The 2511.19065 schedule's horizon defaults to the whole run, also when the config is checked."""
    from mfrae.train.stages import load_stage_config

    cfg = load_stage_config("mft", "digits", ["objective.schedule={k: 1.0, alpha: min_snr}", "train.steps=7"])
    assert cfg.objective["schedule"] == {"k": 1.0, "alpha": "min_snr"}
