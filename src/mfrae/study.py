"""`mfrae study`: the claims of MF-RAE (arXiv 2511.13019) and of arXiv 2511.19065, tested at small scale.

On top of a demo run (`--from`, default runs/demo; trained first when it is missing), which gives the frozen
encoder, the RAE decoder and statistics, the judge, the flow-matching teacher and the CMT student, every
claim is an ablation of ordinary `mfrae train` runs on the `digits` preset, each with several seeds:

    1 init        MFD from random weights, from the teacher, from CMT (paper Sec. 3.2, the 512 ablation)
    2 signal      at one step budget from CMT: MFT alone, MFD alone, MFD then a short MFT (Table 2), and the
                  Proposition 3.1 mixture w_lambda = (1 - lambda)(e - x) + lambda v_teacher for a few lambda
    3 derivative  finite-difference du/dt with steps 1e-4 .. 1e-2 against the exact JVP (Table 3)
    4 schedule    MeanFlow from scratch (MFT objective) with and without the arXiv 2511.19065 weights
    5 guidance    the guidance-free student against one distilled with guidance in its target
    6 cmt_budget  CMT steps against MFD steps at a fixed total budget
    diagnosis     why MFD moves the CMT init in the demo: learning rate, adaptive weight, r != t fraction, EMA

Quality is the judge's Fréchet distance (and class accuracy) of EMA samples measured during training
(`mfrae.train.evaluation`, the same samples for every run: `eval.seed` is fixed), so every run has a curve.
Each claim gets a verdict from fixed rules (`verdict_*`): "reproduced" / "not reproduced" / "inconclusive",
where a difference counts only when it exceeds the spread between seeds. Output: `DIR/study.json`,
`DIR/study.html` (+ its figures as PNG files) and one line per claim on stdout. Runs live under `DIR/runs`;
running the study again reuses every finished run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from mfrae.study_mixture import separated  # the one seed-separation rule of both testbeds

log = logging.getLogger("mfrae")

#################################################################################
#                                 Settings                                      #
#################################################################################


@dataclass(frozen=True)
class StudySettings:
    """Step budgets and sizes of one study mode."""

    steps: int  # MeanFlow steps of every ablation run from an init (the equal budget of claims 1-3, 5)
    mft_tail: int  # claim 2: the short MFT after MFD (MFD gets steps - mft_tail)
    scratch_steps: int  # claim 4: MeanFlow from random weights
    grid_total: int  # claim 6: CMT + MFD steps of every grid point
    grid_cmt: tuple[int, ...]  # claim 6: CMT steps of the grid points (the rest is MFD)
    seeds: tuple[int, ...]
    eval_points: int  # evaluations per run (its FD curve)
    eval_samples: int  # samples per evaluation
    lambdas: tuple[float, ...] = (0.25, 0.5, 0.75)
    fd_steps: tuple[float, ...] = (1e-4, 1e-3, 5e-3, 1e-2)
    guidance_omega: float = 2.0
    comparison_per_class: int = 3  # images per class and model in the sample comparison
    cost_samples: int = 500  # samples per point of the FD-against-NFE plot
    demo: str = "full"  # demo mode that builds the base when --from holds none


FULL = StudySettings(steps=200, mft_tail=50, scratch_steps=400, grid_total=200, grid_cmt=(0, 50, 100, 200),
                     seeds=(0, 1), eval_points=4, eval_samples=500)
# --fast: every claim row with finite numbers, in minutes; the numbers themselves mean little.
FAST = StudySettings(steps=20, mft_tail=10, scratch_steps=20, grid_total=20, grid_cmt=(0, 10, 20), seeds=(0, 1),
                     eval_points=1, eval_samples=100, lambdas=(0.5,), comparison_per_class=1, cost_samples=100,
                     demo="fast")

LOG_EVERY = 10
EVAL_SEED = 1000  # the same evaluation noise and labels for every run


#################################################################################
#                                   Runs                                        #
#################################################################################


@dataclass(frozen=True)
class RunSpec:
    """One training run of an ablation: stage, init, steps and `--set` overrides beyond the study's own."""

    name: str
    stage: str
    steps: int
    init: str | None = None  # model.init (a run dir, checkpoint folder or "scratch"); None: the preset's
    overrides: tuple[str, ...] = ()
    keep_every: int | None = None  # also keep checkpoints every this many steps (an init of another run)


@dataclass
class RunResult:
    """What a finished (or diverged) run measured."""

    name: str
    seed: int
    path: str
    steps: int
    diverged: bool
    curve: dict[int, float]  # step -> 1-step FD during training
    curve_2step: dict[int, float]
    final: dict[str, float]  # fd_1step, fd_2step, class_acc_1step at the last evaluation
    grad_norm_max: float  # the largest pre-clip gradient norm of the run
    seconds_per_step: float  # median over log windows (evaluations excluded)
    mse: dict[str, dict[int, float]] = field(default_factory=dict)  # mse / mse_r_eq_t / mse_r_neq_t curves
    loss: dict[int, float] = field(default_factory=dict)  # the weighted training loss


def _records(run: Path) -> list[dict]:
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def summarise(name: str, seed: int, run: Path, steps: int, diverged: bool) -> RunResult:
    records = _records(run)
    curve = {r["step"]: r["eval/fd_1step"] for r in records if "eval/fd_1step" in r}
    curve2 = {r["step"]: r["eval/fd_2step"] for r in records if "eval/fd_2step" in r}
    last = max((r for r in records if "eval/fd_1step" in r), key=lambda r: r["step"], default={})
    final = {"fd_1step": last.get("eval/fd_1step", math.nan), "fd_2step": last.get("eval/fd_2step", math.nan),
             "class_acc_1step": last.get("eval/class_acc_1step", math.nan)}
    if diverged:  # what the run reached is not its result
        final = {k: math.nan for k in final}
    grads = [r.get("grad_norm_max", r.get("grad_norm", math.nan)) for r in records]
    rates = [1.0 / r["steps_per_sec"] for r in records if r.get("steps_per_sec")]
    mse = {k: {r["step"]: r[k] for r in records if k in r and "diverged" not in r}
           for k in ("mse", "mse_r_eq_t", "mse_r_neq_t")}
    return RunResult(name, seed, str(run), steps, diverged, curve, curve2, final,
                     float(np.nanmax(grads)) if grads else math.nan,
                     float(np.median(rates)) if rates else math.nan,
                     {k: v for k, v in mse.items() if v},
                     {r["step"]: r["loss"] for r in records if "loss" in r and "diverged" not in r})


class Study:
    """The ablation runs on top of one demo run (`base`), written under `out`."""

    def __init__(self, out: Path, base: Path, settings: StudySettings):
        from mfrae.demo import FAST as DEMO_FAST, FULL as DEMO_FULL, Demo

        self.out, self.base, self.s = out, base, settings
        self.demo = Demo(base, DEMO_FAST if settings.demo == "fast" else DEMO_FULL)
        self.results: dict[str, list[RunResult]] = {}
        self._rae = None

    @property
    def rae(self):
        """The base run's RAE, loaded once (for the init's FD, the cost plot and the sample comparison)."""
        if self._rae is None:
            self._rae = self.demo.rae()
        return self._rae

    # -- the base ---------------------------------------------------------------------------------

    def ensure_base(self) -> None:
        """Train the demo's stages up to CMT into `base` when they are not there (finished ones are reused)."""
        needed = ["encoder.safetensors", "judge.safetensors", "judge_reference.npz", "decoder", "stats", "teacher", "cmt"]
        if all((self.base / n).exists() for n in needed) and self.demo_finished("cmt"):
            return
        log.info("study: no finished demo run in %s; training its stages first", self.base)
        d, s = self.demo, self.demo.settings
        d.out.mkdir(parents=True, exist_ok=True)
        encoder = d.encoder()
        d.decoder()
        d.statistics(encoder)
        judge = d.judge()
        d._train("teacher", s.teacher_steps, judge=judge)
        d._train("cmt", s.cmt_steps, judge=judge)

    def demo_finished(self, stage: str) -> bool:
        from mfrae.train.runs import RunDir

        return RunDir(self.base / stage).latest_checkpoint() is not None

    # -- one run ----------------------------------------------------------------------------------

    def overrides(self, spec: RunSpec, seed: int) -> list[str]:
        s = self.s
        every = max(LOG_EVERY, spec.steps // s.eval_points // LOG_EVERY * LOG_EVERY)
        keep = spec.keep_every or spec.steps
        return [
            *[o for o in self.demo.common_overrides() if not o.startswith("train.seed=")], f"train.seed={seed}", f"train.steps={spec.steps}",
            f"train.log_every={LOG_EVERY}", f"train.ckpt_every={keep}", f"train.keep_last={spec.steps // keep + 1}",
            "train.sample_count=10",
            f"eval.every={every}", f"eval.num_samples={s.eval_samples}", "eval.steps=[1, 2]", f"eval.seed={EVAL_SEED}",
            f"eval.feature_options={{extra: {{judge: {self.base / 'judge.safetensors'}}}}}",
            f"eval.reference={self.base / 'judge_reference.npz'}",
            *([f"model.init={spec.init}"] if spec.init is not None else []),
            *spec.overrides,
        ]

    def run_dir(self, spec: RunSpec, seed: int) -> Path:
        return self.out / "runs" / spec.name / f"seed{seed}"

    def train(self, spec: RunSpec, seed: int) -> RunResult:
        """Train `spec` with `seed` (or reuse it when it finished before) and summarise it."""
        from mfrae.train.engine import TrainingDiverged
        from mfrae.train.runs import RunDir
        from mfrae.train.stages import load_stage_config, train_stage

        run = self.run_dir(spec, seed)
        marker = run / "study_done.json"
        if marker.is_file():
            done = json.loads(marker.read_text())
            return summarise(spec.name, seed, run, spec.steps, done["diverged"])
        if run.exists():  # an interrupted run of an earlier study: start it again
            shutil.rmtree(run)
        cfg = load_stage_config(spec.stage, "digits", self.overrides(spec, seed))
        start = time.perf_counter()
        diverged = False
        try:
            train_stage(cfg, run, command=["mfrae", "study", spec.name, f"seed{seed}"])
        except TrainingDiverged as err:
            log.info("study: %s seed %d diverged: %s", spec.name, seed, err)
            diverged = True
        marker.write_text(json.dumps({"diverged": diverged, "seconds": time.perf_counter() - start}))
        assert diverged or RunDir(run).latest_checkpoint() is not None
        return summarise(spec.name, seed, run, spec.steps, diverged)

    def checkpoint(self, spec: RunSpec, seed: int, step: int) -> str:
        return str(self.run_dir(spec, seed) / "checkpoints" / f"step_{step:08d}")

    def run_all(self, specs: list[RunSpec], seeded_specs=None) -> None:
        """Train every spec for every seed, in order (a spec may start from a checkpoint of an earlier one)."""
        for spec in specs:
            for seed in self.s.seeds:
                spec_s = seeded_specs(spec, seed) if seeded_specs else spec
                start = time.perf_counter()
                result = self.train(spec_s, seed)
                self.results.setdefault(spec.name, []).append(result)
                print(f"  {spec.name:24s} seed {seed}: 1-step FD {result.final['fd_1step']:8.2f}, 2-step "
                      f"{result.final['fd_2step']:8.2f}, max grad norm {result.grad_norm_max:9.3g}"
                      f"{' DIVERGED' if result.diverged else ''}  ({time.perf_counter() - start:.0f} s)", flush=True)


#################################################################################
#                                The ablations                                  #
#################################################################################


def ablation_specs(s: StudySettings, base: Path) -> list[RunSpec]:
    """Every run of the study, in training order. Names are shared between claims where a run serves several
    (the MFD-from-CMT baseline serves claims 1, 2, 3, 5 and the diagnosis)."""
    cmt, teacher = str(base / "cmt"), str(base / "teacher")
    mfd_head = s.steps - s.mft_tail
    grid_mfd = sorted({s.grid_total - c for c in s.grid_cmt if 0 < c < s.grid_total})
    specs = [
        # the baseline: MFD from CMT with the preset's settings (finite difference, step 5e-3)
        RunSpec("mfd", "mfd", s.steps, cmt, keep_every=math.gcd(mfd_head, s.steps)),
        # 1 init
        RunSpec("mfd_from_random", "mfd", s.steps, "scratch"),
        RunSpec("mfd_from_teacher", "mfd", s.steps, teacher),
        # 2 signal (the MFT after MFD starts from the baseline's checkpoint at steps - mft_tail)
        RunSpec("mft", "mft", s.steps, cmt),
        RunSpec("mfd_then_mft", "mft", s.mft_tail, "@mfd_head"),
        *[RunSpec(f"mix_{lam:g}", "mfd", s.steps, cmt, (f"objective.teacher_mix={lam}",)) for lam in s.lambdas],
        # 3 derivative
        *[RunSpec(f"fd_{h:g}", "mfd", s.steps, cmt, (f"objective.fd_step={h}",)) for h in s.fd_steps if h != 5e-3],
        RunSpec("jvp", "mfd", s.steps, cmt, ("objective.derivative=jvp",)),
        # 5 guidance in the target (distilled from the teacher's conditional and unconditional velocities)
        RunSpec("mfd_guided", "mfd", s.steps, cmt,
                (f"objective.guidance={{omega: {s.guidance_omega}, source: teacher}}",)),
        # 4 schedule: MeanFlow from scratch, the MFT objective
        RunSpec("scratch", "mft", s.scratch_steps, "scratch"),
        RunSpec("scratch_improved", "mft", s.scratch_steps, "scratch", ("objective.schedule={k: 1.0, alpha: min_snr}",)),
        # 6 CMT vs MFD at a fixed budget: one CMT run from the teacher, MFD from its checkpoints
        RunSpec("grid_cmt", "cmt", s.grid_total, teacher,
                keep_every=math.gcd(*[c for c in s.grid_cmt if c > 0], s.grid_total)),
        *[RunSpec(f"grid_mfd_{m}", "mfd", m, f"@grid_cmt:{s.grid_total - m}") for m in grid_mfd],
        # (no CMT at all: MFD from the teacher for the whole budget is claim 1's run when the budgets agree)
        *([] if s.grid_total == s.steps else [RunSpec(f"grid_mfd_{s.grid_total}", "mfd", s.grid_total, teacher)]),
        # diagnosis of MFD after CMT
        RunSpec("diag_lr_1e-4", "mfd", s.steps, cmt, ("optim.lr=1.0e-4",)),
        RunSpec("diag_adaptive_p0", "mfd", s.steps, cmt, ("objective.adaptive_p=0.0",)),
        RunSpec("diag_fraction_0.25", "mfd", s.steps, cmt, ("objective.fraction_r_neq_t=0.25",)),
        RunSpec("diag_ema_0.999", "mfd", s.steps, cmt, ("train.ema_decay=0.999",)),
    ]
    return specs


#################################################################################
#                                  Verdicts                                     #
#################################################################################


def _finals(results: list[RunResult], key: str) -> np.ndarray:
    return np.array([r.final[key] for r in results], dtype=float)


def mean_and_spread(values: np.ndarray) -> tuple[float, float]:
    """(mean, max - min) over seeds; NaN when any seed has no finite value."""
    if len(values) == 0 or not np.all(np.isfinite(values)):
        return math.nan, math.nan
    return float(values.mean()), float(values.max() - values.min())


def verdict_init(r: dict[str, list[RunResult]]) -> tuple[str, str]:
    cmt, rand, teach = r["mfd"], r["mfd_from_random"], r["mfd_from_teacher"]
    g = {k: max(x.grad_norm_max for x in v) for k, v in (("cmt", cmt), ("random", rand), ("teacher", teach))}
    div = {k: any(x.diverged for x in v) for k, v in (("cmt", cmt), ("random", rand), ("teacher", teach))}
    unstable = {k: div[k] or g[k] > 10 * g["cmt"] for k in ("random", "teacher")}
    detail = (f"max pre-clip gradient norm: CMT init {g['cmt']:.3g}, teacher init {g['teacher']:.3g}, random init "
              f"{g['random']:.3g}; divergence guard fired: {div}")
    if div["cmt"]:
        return "not reproduced", detail + " (the CMT init diverged)"
    if all(unstable.values()):
        return "reproduced", detail
    if not any(unstable.values()):
        return "not reproduced", detail + "; no init blew up (gradient norms within 10x of the CMT init's)"
    return "inconclusive", detail


def _order_verdict(names: list[str], r: dict[str, list[RunResult]], key: str) -> tuple[str, str]:
    """names from worst to best: reproduced when each is separated from the next (seed ranges apart)."""
    finals = [_finals(r[n], key) for n in names]
    detail = ", ".join(f"{n} {mean_and_spread(f)[0]:.2f} (+-{mean_and_spread(f)[1] / 2:.2f})" for n, f in zip(names, finals))
    steps = [separated(finals[i + 1], finals[i]) for i in range(len(names) - 1)]
    if all(s == 1 for s in steps):
        return "reproduced", detail
    if any(s == -1 for s in steps):
        return "not reproduced", detail
    return "inconclusive", detail


def verdict_signal(r: dict[str, list[RunResult]]) -> tuple[str, str]:
    v1, d1 = _order_verdict(["mft", "mfd", "mfd_then_mft"], r, "fd_1step")
    v2, d2 = _order_verdict(["mft", "mfd", "mfd_then_mft"], r, "fd_2step")
    verdict = v1 if v1 == v2 else ("not reproduced" if "not reproduced" in (v1, v2) else "inconclusive")
    return verdict, f"1-step FD (worst to best as claimed): {d1}; 2-step FD: {d2}"


def verdict_derivative(r: dict[str, list[RunResult]], s: StudySettings) -> tuple[str, str]:
    jvp = _finals(r["jvp"], "fd_1step")
    name = lambda h: "mfd" if h == 5e-3 else f"fd_{h:g}"  # noqa: E731
    close, parts = [], []
    for h in s.fd_steps:
        f = _finals(r[name(h)], "fd_1step")
        tol = max(mean_and_spread(f)[1], mean_and_spread(jvp)[1], 0.05 * abs(mean_and_spread(jvp)[0]))
        close.append((h, abs(mean_and_spread(f)[0] - mean_and_spread(jvp)[0]) <= tol))
        parts.append(f"h={h:g}: {mean_and_spread(f)[0]:.2f}")
    t_fd = np.nanmedian([x.seconds_per_step for x in r["mfd"]])
    t_jvp = np.nanmedian([x.seconds_per_step for x in r["jvp"]])
    speed = t_jvp / t_fd
    in_range = all(ok for h, ok in close if 1e-3 <= h <= 1e-2)
    degraded = not dict(close).get(1e-4, True)
    detail = (f"final 1-step FD: {', '.join(parts)}, JVP {mean_and_spread(jvp)[0]:.2f}; seconds per step: finite "
              f"difference {t_fd:.3f}, JVP {t_jvp:.3f} (JVP / FD = {speed:.2f}); h = 1e-4 "
              f"{'degraded' if degraded else 'not degraded'}")
    if in_range and degraded and speed >= 1.3:
        return "reproduced", detail
    if not in_range or speed < 1.0:
        return "not reproduced", detail
    return "inconclusive", detail + " (FD ~ JVP holds; the rest of the claim does not show here)"


def steps_to_reach(curves: list[RunResult], target: float) -> float:
    """The first evaluation step at which the seed-mean 1-step FD is <= target (inf if never)."""
    steps = sorted(set.intersection(*[set(c.curve) for c in curves])) if curves else []
    for step in steps:
        if np.mean([c.curve[step] for c in curves]) <= target:
            return float(step)
    return math.inf


def verdict_schedule(r: dict[str, list[RunResult]]) -> tuple[str, str]:
    base, improved = r["scratch"], r["scratch_improved"]
    target = mean_and_spread(_finals(base, "fd_1step"))[0]
    reached_base = steps_to_reach(base, target)
    reached = steps_to_reach(improved, target)
    speedup = reached_base / reached if math.isfinite(reached) and reached > 0 else 0.0
    detail = (f"baseline's final 1-step FD {target:.2f} reached at step {reached_base:g} (baseline) and "
              f"{reached:g} (with the schedule): {speedup:.2f}x as fast; final FD with the schedule "
              f"{mean_and_spread(_finals(improved, 'fd_1step'))[0]:.2f}")
    order = separated(_finals(improved, "fd_1step"), _finals(base, "fd_1step"))
    if speedup > 1.0 and order == 1:
        return "reproduced", detail
    if order == -1 or speedup == 0.0:
        return "not reproduced", detail
    return "inconclusive", detail


def verdict_guidance(r: dict[str, list[RunResult]]) -> tuple[str, str]:
    free, guided = r["mfd"], r["mfd_guided"]
    f_fd, g_fd = _finals(free, "fd_1step"), _finals(guided, "fd_1step")
    f_acc, g_acc = _finals(free, "class_acc_1step"), _finals(guided, "class_acc_1step")
    detail = (f"1-step FD guidance-free {mean_and_spread(f_fd)[0]:.2f} vs guided {mean_and_spread(g_fd)[0]:.2f}; "
              f"class accuracy {np.mean(f_acc):.3f} vs {np.mean(g_acc):.3f}")
    # The claim: guidance is not needed, i.e. the unguided model is not worse beyond the seed spread.
    if separated(g_fd, f_fd) == 1 or np.mean(f_acc) < np.mean(g_acc) - 0.02:
        return "not reproduced", detail
    return "reproduced", detail


def verdict_cmt_budget(r: dict[str, list[RunResult]], s: StudySettings) -> tuple[str, str]:
    points = grid_points(r, s)
    means = {c: mean_and_spread(v)[0] for c, v in points.items()}
    detail = ", ".join(f"CMT {c} + MFD {s.grid_total - c}: {m:.2f}" for c, m in sorted(means.items()))
    best = min(means, key=lambda c: means[c] if math.isfinite(means[c]) else math.inf)
    no_cmt = points[0]
    helped = all(separated(v, no_cmt) == 1 for c, v in points.items() if c > 0)
    if best * 2 >= s.grid_total and helped:
        return "reproduced", detail
    if best == 0:
        return "not reproduced", detail
    return "inconclusive", detail


def grid_points(r: dict[str, list[RunResult]], s: StudySettings) -> dict[int, np.ndarray]:
    """CMT steps -> final 1-step FD per seed of that grid point (CMT alone: the CMT run's own final FD)."""
    out = {}
    for c in s.grid_cmt:
        name = "grid_cmt" if c == s.grid_total else f"grid_mfd_{s.grid_total - c}"
        if c == 0 and s.grid_total == s.steps:
            name = "mfd_from_teacher"
        out[c] = _finals(r[name], "fd_1step")
    return out


def diagnosis(r: dict[str, list[RunResult]], init_fd: float) -> dict:
    """MFD from CMT under each variant: the change of the 1-step FD from the CMT init's."""
    names = ["mfd", "diag_lr_1e-4", "diag_adaptive_p0", "diag_fraction_0.25", "diag_ema_0.999", "jvp", "fd_0.001",
             "mix_0.5"]
    rows = {}
    for n in names:
        if n in r:
            m, spread = mean_and_spread(_finals(r[n], "fd_1step"))
            rows[n] = {"fd_1step": m, "spread": spread, "change_from_init": m - init_fd,
                       "fd_2step": mean_and_spread(_finals(r[n], "fd_2step"))[0]}
    return rows


#################################################################################
#                         Measurements beyond the runs                          #
#################################################################################


def init_quality(study: Study) -> dict[str, float]:
    """1-step and 2-step FD of the CMT init itself (step 0 of every run from it), measured like the runs."""
    from mfrae.checkpoint import load_dit_dh
    from mfrae.distributed import DistInfo
    from mfrae.train.evaluation import meanflow_evaluator
    from mfrae.train.runs import resolve_weights
    from mfrae.train.stages import load_stage_config

    spec = RunSpec("init", "mfd", study.s.steps, str(study.base / "cmt"))
    cfg = load_stage_config("mfd", "digits", study.overrides(spec, 0))
    evaluate = meanflow_evaluator(cfg.eval, study.rae, 10, DistInfo())
    result = evaluate(load_dit_dh(resolve_weights(study.base / "cmt")).eval(), 0)
    return {"fd_1step": result["eval/fd_1step"], "fd_2step": result["eval/fd_2step"],
            "class_acc_1step": result.get("eval/class_acc_1step", math.nan)}


def quality_against_cost(study: Study, models: dict[str, str]) -> dict[str, list[dict]]:
    """FD of each model at several NFE (teacher: Euler steps; MeanFlow: jumps) with true GFLOPs per image."""
    from mfrae.checkpoint import load_dit_dh
    from mfrae.eval.judge import DigitsJudge, judge_metrics
    from mfrae.eval.metrics import FeatureStats
    from mfrae.flops import count_true_flops
    from mfrae.generation import SampleSettings, generate
    from mfrae.train.runs import resolve_weights
    from mfrae.train.stages import load_stage_config

    rae = study.rae
    judge = DigitsJudge.load(study.base / "judge.safetensors")
    reference = FeatureStats.load(study.base / "judge_reference.npz")
    shift = load_stage_config("teacher", "digits", study.demo.common_overrides()).objective.get("shift", 1.0)
    labels = torch.arange(study.s.cost_samples) % 10
    tokens = torch.zeros(1, rae.decoder.config.num_patches, rae.decoder.config.encoder_hidden_size)
    decoder_gflops = count_true_flops(rae.decoder, tokens) * 1e-9
    out: dict[str, list[dict]] = {}
    for name, path in models.items():
        model = load_dit_dh(resolve_weights(path)).eval()
        x, t, y = torch.zeros(1, *model.latent_shape), torch.ones(1), torch.zeros(1, dtype=torch.long)
        backbone = count_true_flops(model, x, t, y) * 1e-9
        nfes = (4, 8, 16, 49) if name == "teacher" else (1, 2, 4)
        for nfe in nfes:
            settings = SampleSettings(steps=nfe, batch_size=250, shift=shift)
            images = generate(model, rae, labels, settings, seed=EVAL_SEED)
            m = judge_metrics(judge, images, labels, reference)
            out.setdefault(name, []).append({"nfe": nfe, "gflops": decoder_gflops + nfe * backbone, "fd": m["fd"],
                                             "class_accuracy": m["class_accuracy"]})
    return out


def comparison_samples(study: Study, models: dict[str, str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """1-step samples of each final model for the same classes and noise (the sample comparison)."""
    from mfrae.checkpoint import load_dit_dh
    from mfrae.generation import SampleSettings, generate
    from mfrae.train.runs import resolve_weights

    rae = study.rae
    labels = torch.arange(10).repeat_interleave(study.s.comparison_per_class)
    images = {}
    for name, path in models.items():
        images[name] = generate(load_dit_dh(resolve_weights(path)).eval(), rae, labels, SampleSettings(steps=1),
                                seed=EVAL_SEED)
    return images, labels


#################################################################################
#                                 The report                                    #
#################################################################################

CLAIMS = {
    "1_init": "MFD is unstable from random init and from the teacher, stable from CMT (MF-RAE Sec. 3.2)",
    "2_signal": "at equal steps from CMT: MFT alone < MFD alone < MFD then MFT, 1- and 2-step (MF-RAE Table 2)",
    "3_derivative": "finite difference with h in [1e-3, 1e-2] ~ exact JVP, worse at 1e-4, ~1.5x faster (MF-RAE Table 3)",
    "4_schedule": "the arXiv 2511.19065 weights make MeanFlow from scratch converge faster",
    "5_guidance": "guidance-free distillation loses nothing against guidance in the target (MF-RAE's simplification)",
    "6_cmt_budget": "at a fixed budget, spending most of it on CMT gives the best 1-step model (this scale)",
}


def _curves(r: dict[str, list[RunResult]], names: list[str], mse: str | None = None) -> dict[str, dict[float, list[float]]]:
    """run name -> step -> values over seeds: the 1-step FD curve, or the logged MSE `mse` when named."""
    out: dict[str, dict[float, list[float]]] = {}
    for n in names:
        for res in r.get(n, []):
            for step, value in (res.curve if mse is None else res.mse.get(mse, {})).items():
                out.setdefault(n, {}).setdefault(float(step), []).append(float(value))
    return out


def write_report(out: Path, summary: dict, r: dict[str, list[RunResult]], samples, labels, cost, s: StudySettings) -> Path:
    from mfrae.plots import (TABLE_PAGE_HEAD, bar_figure, cost_figure, curves_figure, png_html,
                             sample_comparison_figure, write_pngs)

    figures = {
        "init": curves_figure(_curves(r, ["mfd", "mfd_from_teacher", "mfd_from_random"]), xlabel="step",
                              ylabel="1-step FD", title="1. Initialisation: MFD from CMT / teacher / random", logy=True),
        "init_grad": bar_figure({n: [x.grad_norm_max for x in r[n]] for n in ["mfd", "mfd_from_teacher", "mfd_from_random"]},
                                ylabel="max pre-clip gradient norm", title="1. Initialisation: largest gradient norm"),
        "signal": curves_figure(_curves(r, ["mft", "mfd", *[f"mix_{lam:g}" for lam in s.lambdas]]), xlabel="step",
                                ylabel="1-step FD", title="2. Training signal from CMT (w_lambda: mix_lambda)"),
        "signal_bars": bar_figure({n: list(_finals(r[n], "fd_1step")) for n in
                                   ["mft", "mfd", "mfd_then_mft", *[f"mix_{lam:g}" for lam in s.lambdas]]},
                                  ylabel="final 1-step FD", title="2. Training signal: final 1-step FD"),
        "derivative": bar_figure({("mfd (h=0.005)" if h == 5e-3 else f"fd_{h:g}"): list(_finals(r["mfd" if h == 5e-3 else f"fd_{h:g}"], "fd_1step"))
                                  for h in s.fd_steps} | {"jvp": list(_finals(r["jvp"], "fd_1step"))},
                                 ylabel="final 1-step FD", title="3. du/dt: finite difference step against JVP"),
        "schedule": curves_figure(_curves(r, ["scratch", "scratch_improved"]), xlabel="step", ylabel="1-step FD",
                                  title="4. MeanFlow from scratch, with / without the 2511.19065 weights", logy=True),
        "guidance": bar_figure({"guidance-free": list(_finals(r["mfd"], "fd_1step")),
                                "guided target": list(_finals(r["mfd_guided"], "fd_1step"))},
                               ylabel="final 1-step FD", title="5. Guidance-free against guidance in the target"),
        "cmt_budget": bar_figure({f"CMT {c} / MFD {s.grid_total - c}": list(v) for c, v in grid_points(r, s).items()},
                                 ylabel="final 1-step FD", title=f"6. CMT against MFD steps, {s.grid_total} in all"),
        "mse": curves_figure(_curves(r, ["mfd", "mft", "diag_adaptive_p0"], "mse_r_neq_t"), xlabel="step",
                             ylabel="unweighted MSE, r != t rows", title="Unweighted MeanFlow MSE (r != t rows)", logy=True),
        "mse_eq": curves_figure(_curves(r, ["mfd", "mft", "diag_adaptive_p0"], "mse_r_eq_t"), xlabel="step",
                                ylabel="unweighted MSE, r = t rows", title="Unweighted MeanFlow MSE (r = t rows)", logy=True),
        "diagnosis": curves_figure(_curves(r, ["mfd", "diag_lr_1e-4", "diag_adaptive_p0", "diag_fraction_0.25",
                                               "diag_ema_0.999"]), xlabel="step", ylabel="1-step FD",
                                   title="Diagnosis: MFD from CMT (init FD dashed in the table)"),
        "fd_vs_nfe": cost_figure({n: [(p["nfe"], p["fd"]) for p in pts] for n, pts in cost.items()}, xlabel="NFE",
                                 ylabel="FD", title="FD against NFE"),
        "fd_vs_gflops": cost_figure({n: [(p["gflops"], p["fd"]) for p in pts] for n, pts in cost.items()},
                                    xlabel="GFLOPs per image (decoder included)", ylabel="FD", title="FD against GFLOPs"),
        "samples": sample_comparison_figure(samples, labels, class_names=[str(c) for c in range(10)],
                                            per_class=s.comparison_per_class, title="1-step samples, same noise"),
    }
    pngs = write_pngs(figures, out, "study_")
    rows = "".join(f"<tr><td>{k}</td><td>{CLAIMS[k]}</td><td><b>{v['verdict']}</b></td><td>{v['detail']}</td></tr>"
                   for k, v in summary["claims"].items())
    diag = "".join(f"<tr><td>{n}</td><td>{d['fd_1step']:.2f}</td><td>{d['spread']:.2f}</td><td>{d['change_from_init']:+.2f}</td>"
                   f"<td>{d['fd_2step']:.2f}</td></tr>" for n, d in summary["diagnosis"].items())
    head = TABLE_PAGE_HEAD.format(title="mfrae study", heading="mfrae study: the papers' claims at small scale")
    body = head + f"""<p>Mode {summary['mode']}, seeds {list(s.seeds)}, {summary['seconds_total']:.0f} s. Base run: {summary['base']}.
FD: the digits judge's Fréchet distance of {s.eval_samples} EMA samples against the test split (lower is better).
A difference counts only when the seed ranges do not overlap.</p>
<h2>Verdicts</h2><table><tr><th>claim</th><th>statement</th><th>verdict</th><th>numbers</th></tr>{rows}</table>
<h2>Samples</h2>{png_html(pngs['samples'], 'samples')}
<h2>Quality against cost</h2>{png_html(pngs['fd_vs_nfe'], 'FD against NFE')}{png_html(pngs['fd_vs_gflops'], 'FD against GFLOPs')}
<h2>Claims</h2>{''.join(png_html(pngs[n], n) for n in ['init', 'init_grad', 'signal', 'signal_bars', 'derivative', 'schedule', 'guidance', 'cmt_budget'])}
<h2>Why MFD moves the CMT init</h2><p>CMT init: 1-step FD {summary['init']['fd_1step']:.2f}, 2-step {summary['init']['fd_2step']:.2f}.</p>
<table><tr><th>run</th><th>final 1-step FD</th><th>seed range</th><th>change from init</th><th>2-step FD</th></tr>{diag}</table>
{png_html(pngs['diagnosis'], 'diagnosis')}{png_html(pngs['mse'], 'mse')}{png_html(pngs['mse_eq'], 'mse r=t')}
</body></html>"""
    path = out / "study.html"
    path.write_text(body)
    return path


#################################################################################
#                                   Driver                                      #
#################################################################################


def run_study(out: Path, base: Path, s: StudySettings) -> dict:
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    study = Study(out, base, s)
    study.ensure_base()
    specs = ablation_specs(s, base)
    mfd_head = s.steps - s.mft_tail

    def seeded(spec: RunSpec, seed: int) -> RunSpec:
        """Resolve an init that names a checkpoint of an earlier run of the same seed."""
        if spec.init == "@mfd_head":
            return RunSpec(spec.name, spec.stage, spec.steps, study.checkpoint(specs[0], seed, mfd_head), spec.overrides)
        if spec.init and spec.init.startswith("@grid_cmt:"):
            grid = next(x for x in specs if x.name == "grid_cmt")
            return RunSpec(spec.name, spec.stage, spec.steps, study.checkpoint(grid, seed, int(spec.init.split(":")[1])),
                           spec.overrides)
        return spec

    init = init_quality(study)
    print(f"CMT init: 1-step FD {init['fd_1step']:.2f}, 2-step {init['fd_2step']:.2f}", flush=True)
    study.run_all(specs, seeded)
    r = study.results
    claims = {
        "1_init": verdict_init(r), "2_signal": verdict_signal(r), "3_derivative": verdict_derivative(r, s),
        "4_schedule": verdict_schedule(r), "5_guidance": verdict_guidance(r), "6_cmt_budget": verdict_cmt_budget(r, s),
    }
    finals = {"teacher": str(base / "teacher"), "cmt (init)": str(base / "cmt"),
              "mfd": study.run_dir(specs[0], s.seeds[0]), "mft": study.run_dir(RunSpec("mft", "mft", 0), s.seeds[0]),
              "mfd_then_mft": study.run_dir(RunSpec("mfd_then_mft", "mft", 0), s.seeds[0]),
              "mfd_guided": study.run_dir(RunSpec("mfd_guided", "mfd", 0), s.seeds[0])}
    meanflow = {k: str(v) for k, v in finals.items() if k != "teacher"}
    cost = quality_against_cost(study, {"teacher": finals["teacher"], **{k: meanflow[k] for k in ("cmt (init)", "mfd", "mfd_then_mft")}})
    samples, labels = comparison_samples(study, meanflow)
    summary = {
        "mode": "fast" if s is FAST else "full", "settings": asdict(s), "base": str(base), "init": init,
        "claims": {k: {"statement": CLAIMS[k], "verdict": v, "detail": d} for k, (v, d) in claims.items()},
        "diagnosis": diagnosis(r, init["fd_1step"]),
        "quality_against_cost": cost,
        "runs": {n: [asdict(x) for x in v] for n, v in r.items()},
    }
    summary["seconds_total"] = time.perf_counter() - start
    write_report(out, summary, r, samples, labels, cost, s)
    from mfrae.report import json_safe

    (out / "study.json").write_text(json.dumps(json_safe(summary, "study"), indent=1))
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--testbed", choices=("digits", "mixture"), default="digits",
                        help="digits: ablations of the digits pipeline on a demo run; mixture: Gaussian mixtures "
                             "with an exact teacher and an exact answer (mfrae.study_mixture)")
    parser.add_argument("--out", default="runs/study", help="output folder (default runs/study)")
    parser.add_argument("--from", dest="base", default="runs/demo",
                        help="digits: the demo run to build on (default runs/demo); its stages are trained first "
                             "if missing")
    parser.add_argument("--fast", action="store_true", help="tiny budgets: every claim row, numbers without meaning")
    parser.add_argument("--workers", type=int, default=None,
                        help="mixture: runs in parallel, one thread each (default: the available cores)")


def run(args: argparse.Namespace) -> int:
    if args.testbed == "mixture":
        return run_mixture(args)
    s = FAST if args.fast else FULL
    summary = run_study(Path(args.out), Path(args.base), s)
    for key, claim in summary["claims"].items():
        print(f"{key:14s} {claim['verdict']:15s} {claim['detail']}")
    print(f"report: {Path(args.out) / 'study.html'} and study.json  ({summary['seconds_total']:.0f} s in all)")
    return 0


def run_mixture(args: argparse.Namespace) -> int:
    from mfrae.study_mixture import FAST as MIXTURE_FAST
    from mfrae.study_mixture import FULL as MIXTURE_FULL
    from mfrae.study_mixture import default_workers, run_mixture_study

    workers = default_workers() if args.workers is None else args.workers
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    summary = run_mixture_study(Path(args.out), MIXTURE_FAST if args.fast else MIXTURE_FULL, workers)
    for key, claim in summary["claims"].items():
        print(f"{key:9s} {claim['verdict']}: {claim['conditions']}")
    print(f"report: {Path(args.out) / 'study.html'} and study.json  ({summary['seconds_total']:.0f} s in all)")
    return 0
