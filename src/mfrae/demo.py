"""`mfrae demo`: the whole MF-RAE pipeline on the bundled digits, on a CPU, evaluated, with a report.

    0. encoder    a small ViT trained on the digits, then frozen (stands in for DINOv2, whose weights cannot be
                  downloaded everywhere; with real weights the same pipeline uses DINOv2)
    1. decoder    RAE decoder (L1 + perceptual + GAN, noise-augmented), then the latent statistics
    2. judge      a classifier trained on real digits only, and its feature statistics of the test split: the
                  measure of every later step (Fréchet distance of its penultimate features, class accuracy)
    3. teacher    flow-matching DiT^DH
    4. cmt        consistency mid-training on the teacher's 16-point Euler trajectories
    5. mfd        MeanFlow distillation from the teacher (finite-difference derivative)
    6. mft        MeanFlow bootstrapping with the one-point velocity
    7. sampling   teacher with many ODE steps, MeanFlow with 1 and 2 steps, decoded by the RAE decoder
    8. evaluation the judge on every sampler's images; `DIR/report.html` and `DIR/report.json`

Steps 3-6 also measure the judge FD of their EMA weights while they train (`eval` section of the preset,
`mfrae.train.evaluation`); the report plots those curves.

Every training stage is the ordinary `mfrae train` engine on the `digits` preset with the overrides below;
each run directory under DIR can be inspected, resumed or sampled like any other. Running the demo again
reuses the finished stages and resumes an interrupted one.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mfrae.checkpoint import load_dit_dh, load_latent_stats, load_vit_decoder
from mfrae.data import DigitsDataset
from mfrae.flops import count_linear_macs, count_true_flops
from mfrae.models.dit_dh import DiTDH
from mfrae.models.rae import RAE
from mfrae.models.small_encoder import SmallViTEncoder
from mfrae.train.runs import RunDir, resolve_weights

log = logging.getLogger("mfrae")

#################################################################################
#                              Demo settings                                    #
#################################################################################


@dataclass(frozen=True)
class DemoSettings:
    """Step counts and sizes of one demo mode (everything else comes from the `digits` preset)."""

    encoder_steps: int
    judge_steps: int
    decoder_steps: int
    teacher_steps: int
    cmt_steps: int
    mfd_steps: int
    mft_steps: int
    num_samples: int  # generated images per model for evaluation
    teacher_nfe: int  # ODE evaluations of the teacher
    eval_points: int  # evaluations during each latent stage's training (its FD curve)
    eval_samples: int  # samples per evaluation during training
    overrides: dict[str, list[str]] = field(default_factory=dict)  # extra `--set` overrides per stage


# Full mode: about 13 minutes on 2 cores (measured settings and their choice: docs/demo.md). The teacher samples
# with 49 Euler evaluations on the 50-point grid of the released RAE sampler.
FULL = DemoSettings(
    encoder_steps=400, judge_steps=200, decoder_steps=1200, teacher_steps=1500, cmt_steps=1000, mfd_steps=300,
    mft_steps=200, num_samples=1000, teacher_nfe=49, eval_points=5, eval_samples=500,
)
FAST = DemoSettings(
    encoder_steps=150, judge_steps=200, decoder_steps=200, teacher_steps=300, cmt_steps=60, mfd_steps=150,
    mft_steps=60, num_samples=200, teacher_nfe=16, eval_points=2, eval_samples=200,
)

STAGE_ORDER = ("encoder", "decoder", "judge", "teacher", "cmt", "mfd", "mft", "sampling", "evaluation")
LATENT_STAGES = ("teacher", "cmt", "mfd", "mft")
LOG_EVERY = 20  # train.log_every of the digits preset: in-training evaluations fall on log steps


#################################################################################
#                              Stage results                                    #
#################################################################################


@dataclass(frozen=True)
class StageResult:
    """A stage whose output is on disk: the file or run directory it wrote (or reused) and a summary line."""

    path: Path
    summary: str


@dataclass(frozen=True)
class JudgeResult:
    """The judge (saved to `path`) and its feature statistics of the real test split (saved to `reference`)."""

    path: Path
    reference: Path
    judge: Any  # mfrae.eval.judge.DigitsJudge
    reference_stats: Any  # mfrae.eval.metrics.FeatureStats
    summary: str


@dataclass(frozen=True)
class SamplingResult:
    """The generated images of every sampler, for the same requested classes."""

    samples: dict[str, Tensor]  # sampler name -> images [N, 3, H, W] in [0, 1]
    labels: Tensor  # the requested classes [N] (the same for every sampler)
    speed: dict[str, float]  # sampler name -> images per second (sampling and decoding)
    teacher_nfe: int

    @property
    def summary(self) -> str:
        speed, n = self.speed, len(self.labels)
        ratio = speed["mfd_1step"] / speed["teacher"]
        return (f"{n} images per model; teacher {speed['teacher']:.0f} img/s ({self.teacher_nfe} NFE), "
                f"1-step {speed['mfd_1step']:.0f} img/s ({ratio:.0f}x)")


@dataclass(frozen=True)
class EvaluationResult:
    """Judge metrics (`mfrae.eval.judge.judge_metrics`) of every image set against the real test split."""

    floor: dict  # real training digits (as many as samples per model)
    reconstruction: dict  # their RAE reconstructions
    models: dict[str, dict]  # sampler name -> metrics of its samples
    judge_test_accuracy: float  # the judge's accuracy on the test split itself
    real_images: Tensor  # the real training digits of `floor`
    reconstructions: Tensor  # and their reconstructions

    @property
    def summary(self) -> str:
        m = self.models
        return (f"FD floor {self.floor['fd']:.3g}, teacher {m['teacher']['fd']:.3g}, MFD 1-step "
                f"{m['mfd_1step']['fd']:.3g}, 2-step {m['mfd_2step']['fd']:.3g}; class accuracy MFD 1-step "
                f"{m['mfd_1step']['class_accuracy']:.3f}")


@dataclass(frozen=True)
class DemoResult:
    report: dict  # what report.json holds (less the totals `run` adds)
    sampling: SamplingResult
    evaluation: EvaluationResult


#################################################################################
#                                 Pipeline                                      #
#################################################################################


def _plans(teacher_nfe: int) -> dict[str, tuple[str, int]]:
    """Sampler name -> (trained model, steps: ODE evaluations for the teacher, MeanFlow jumps otherwise)."""
    return {"teacher": ("teacher", teacher_nfe), "cmt_1step": ("cmt", 1), "mfd_1step": ("mfd", 1),
            "mfd_2step": ("mfd", 2), "mft_1step": ("mft", 1), "mft_2step": ("mft", 2)}


class Demo:
    """The stages, each a method returning its result; `run_all` runs them in order and passes the results on."""

    def __init__(self, out: Path, settings: DemoSettings, seed: int = 0):
        self.out, self.settings, self.seed = out, settings, seed

    # -- helpers ----------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        return self.out / name

    def common_overrides(self) -> list[str]:
        return [
            f"rae.encoder.options={{path: {self.path('encoder.safetensors')}}}",
            f"rae.decoder={self.path('decoder')}",
            f"rae.stats={self.path('stats')}",
            f"teacher={self.path('teacher')}",
            f"train.seed={self.seed}",
        ]

    def eval_overrides(self, steps: int, judge: JudgeResult) -> list[str]:
        """Turn on the preset's in-training evaluation with this demo's judge, about `eval_points` times a run."""
        every = max(LOG_EVERY, steps // self.settings.eval_points // LOG_EVERY * LOG_EVERY)
        return [f"eval.every={every}", f"eval.num_samples={self.settings.eval_samples}",
                f"eval.teacher_steps=[{self.settings.teacher_nfe}]", f"eval.seed={self.seed + 1}",
                f"eval.feature_options={{extra: {{judge: {judge.path}}}}}", f"eval.reference={judge.reference}"]

    def _train(self, stage: str, steps: int, init: StageResult | None = None,
               judge: JudgeResult | None = None) -> StageResult:
        from mfrae.train.stages import load_stage_config, train_stage

        run = self.path(stage)
        overrides = [*self.common_overrides(), f"train.steps={steps}", *self.settings.overrides.get(stage, []),
                     *([f"model.init={init.path}"] if init is not None else []),
                     *(self.eval_overrides(steps, judge) if judge is not None else [])]
        cfg = load_stage_config(stage, "digits", overrides)
        latest = RunDir(run).latest_checkpoint()
        if latest is not None and latest.name == f"step_{steps:08d}":
            return StageResult(run, f"reused {run}")
        if latest is None and (run / "run.json").is_file():
            # an earlier demo stopped this stage before its first checkpoint: nothing there to resume or keep
            shutil.rmtree(run)
        train_stage(cfg, run, resume=latest is not None, command=["mfrae", "demo", stage])
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return StageResult(run, f"{steps} steps, final loss {records[-1]['loss']:.4g}")

    def run_all(self) -> DemoResult:
        self.out.mkdir(parents=True, exist_ok=True)
        s, seconds = self.settings, {}
        encoder = _timed(seconds, "encoder", self.encoder)
        _timed(seconds, "decoder", lambda: (self.decoder(), self.statistics(encoder)))
        judge = _timed(seconds, "judge", self.judge)
        _timed(seconds, "teacher", lambda: self._train("teacher", s.teacher_steps, judge=judge))
        cmt = _timed(seconds, "cmt", lambda: self._train("cmt", s.cmt_steps, judge=judge))
        mfd = _timed(seconds, "mfd", lambda: self._train("mfd", s.mfd_steps, init=cmt, judge=judge))
        _timed(seconds, "mft", lambda: self._train("mft", s.mft_steps, init=mfd, judge=judge))
        sampling = _timed(seconds, "sampling", self.sampling)
        evaluation = _timed(seconds, "evaluation", lambda: self.evaluation(sampling, judge))
        return DemoResult(self.report(sampling, evaluation, seconds), sampling, evaluation)

    # -- stages -----------------------------------------------------------------------------------

    def encoder(self) -> StageResult:
        from mfrae.models.small_encoder import save_small_vit
        from mfrae.train.small_encoder import train_small_vit

        path = self.path("encoder.safetensors")
        if path.exists():
            return StageResult(path, f"reused {path}")
        network, stats = train_small_vit(DigitsDataset(split="train"), steps=self.settings.encoder_steps, seed=self.seed)
        save_small_vit(network, path)
        return StageResult(path, ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()))

    def decoder(self) -> StageResult:
        return self._train("decoder", self.settings.decoder_steps)

    def statistics(self, encoder: StageResult) -> StageResult:
        """The latent statistics of the encoder's tokens on the train split (`mfrae.stats`)."""
        from mfrae.checkpoint import save_latent_stats
        from mfrae.stats import STATS_FILE, latent_statistics

        path = self.path("stats") / STATS_FILE
        if path.exists():
            return StageResult(path.parent, "latent statistics reused")
        stats = latent_statistics(SmallViTEncoder(path=str(encoder.path)), DigitsDataset(split="train"), batch_size=128)
        save_latent_stats(stats, path)
        return StageResult(path.parent, "latent statistics written")

    def judge(self) -> JudgeResult:
        """Train the judge on the train split (its own seeded RNG: the training runs' draws do not move) and
        store it with its statistics of the test split, the reference of every FD."""
        from mfrae.eval.judge import DigitsJudge, judge_reference_stats, train_judge
        from mfrae.eval.metrics import FeatureStats

        path, reference = self.path("judge.safetensors"), self.path("judge_reference.npz")
        if path.exists() and reference.exists():
            return JudgeResult(path, reference, DigitsJudge.load(path), FeatureStats.load(reference), f"reused {path}")
        judge = train_judge(DigitsDataset(split="train"), steps=self.settings.judge_steps, seed=self.seed)
        stats = judge_reference_stats(judge, _stack(DigitsDataset(split="test"))[0])
        judge.save(path)
        stats.save(reference)
        return JudgeResult(path, reference, judge, stats, f"{self.settings.judge_steps} steps; test-split statistics written")

    def models(self) -> dict[str, DiTDH]:
        return {name: load_dit_dh(resolve_weights(self.path(name))).eval() for name in ("teacher", "cmt", "mfd", "mft")}

    def rae(self) -> RAE:
        return RAE(
            SmallViTEncoder(path=str(self.path("encoder.safetensors"))),
            load_vit_decoder(resolve_weights(self.path("decoder"))),
            load_latent_stats(resolve_weights(self.path("stats"))),
        ).eval()

    def sampling(self) -> SamplingResult:
        from mfrae.generation import SampleSettings, generate
        from mfrae.train.stages import load_stage_config

        s = self.settings
        rae, models = self.rae(), self.models()
        labels = torch.arange(s.num_samples) % 10
        # The teacher's ODE runs on the time grid it was trained with.
        shift = load_stage_config("teacher", "digits", self.common_overrides()).objective.get("shift", 1.0)
        samples: dict[str, Tensor] = {}
        speed: dict[str, float] = {}
        for name, (model_name, steps) in _plans(s.teacher_nfe).items():
            settings = SampleSettings(steps=steps, batch_size=250, shift=shift)
            start = time.perf_counter()
            samples[name] = generate(models[model_name], rae, labels, settings, seed=self.seed + 1)
            speed[name] = s.num_samples / (time.perf_counter() - start)
        return SamplingResult(samples, labels, speed, s.teacher_nfe)

    def evaluation(self, sampling: SamplingResult, judge_result: JudgeResult) -> EvaluationResult:
        from mfrae.eval.judge import judge_metrics

        s = self.settings
        judge, reference = judge_result.judge, judge_result.reference_stats  # the real test split
        test_images, test_labels = _stack(DigitsDataset(split="test"))
        train_images, train_labels = _stack(DigitsDataset(split="train"), s.num_samples)
        with torch.no_grad():
            rae = self.rae()
            reconstructions = torch.cat([rae(train_images[i : i + 250]).clamp(0, 1) for i in range(0, len(train_images), 250)])
        # The floor: real training digits against the test split, the same sample size as the models.
        return EvaluationResult(
            floor=judge_metrics(judge, train_images, train_labels, reference),
            reconstruction=judge_metrics(judge, reconstructions, train_labels, reference),
            models={name: judge_metrics(judge, images, sampling.labels, reference) for name, images in sampling.samples.items()},
            judge_test_accuracy=judge_metrics(judge, test_images, test_labels, reference)["class_accuracy"],
            real_images=train_images,
            reconstructions=reconstructions,
        )

    # -- report -----------------------------------------------------------------------------------

    def _costs(self) -> dict[str, float]:
        """Per-image GMACs (papers' convention) and true GFLOPs of the demo's backbone and decoder."""
        mf, decoder = self.models()["mfd"], self.rae().decoder
        x = torch.zeros(1, *mf.latent_shape)
        t, y = torch.ones(1), torch.zeros(1, dtype=torch.long)
        tokens = torch.zeros(1, decoder.config.num_patches, decoder.config.encoder_hidden_size)
        return {
            "backbone_gmacs": count_linear_macs(mf, x, t, y) * 1e-9,
            "backbone_gflops_true": count_true_flops(mf, x, t, y) * 1e-9,
            "decoder_gmacs": count_linear_macs(decoder, tokens) * 1e-9,
            "decoder_gflops_true": count_true_flops(decoder, tokens) * 1e-9,
        }

    def report(self, sampling: SamplingResult, evaluation: EvaluationResult, seconds: dict[str, float]) -> dict:
        """The contents of report.json: quality (FD, class accuracy), speed and cost of every sampler."""
        s, speed, metrics = self.settings, sampling.speed, evaluation.models
        costs = self._costs()
        table = [
            {
                "model": name, "nfe": n,
                "gflops_true": costs["decoder_gflops_true"] + n * costs["backbone_gflops_true"],
                "gmacs": costs["decoder_gmacs"] + n * costs["backbone_gmacs"],
                "fd": metrics[name]["fd"], "class_accuracy": metrics[name]["class_accuracy"],
                "images_per_second": speed[name],
            }
            for name, (_, n) in _plans(s.teacher_nfe).items()
        ]
        return {
            "fd_floor": evaluation.floor["fd"],
            "fd_reconstruction": evaluation.reconstruction["fd"],
            **{f"fd_{name}": metrics[name]["fd"] for name in _plans(s.teacher_nfe)},
            **{f"class_acc_{name}": metrics[name]["class_accuracy"]
               for name in ("teacher", "mfd_1step", "mft_1step", "mfd_2step")},
            "class_acc_real": evaluation.floor["class_accuracy"],
            "judge_test_accuracy": evaluation.judge_test_accuracy,
            "teacher_nfe": s.teacher_nfe,
            "num_samples": s.num_samples,
            "images_per_second": {"teacher": speed["teacher"], "1step": speed["mfd_1step"], "2step": speed["mfd_2step"]},
            "speedup_1step_vs_teacher": speed["mfd_1step"] / speed["teacher"],
            "costs_per_image": costs,
            "quality_vs_nfe": table,
            "seconds_per_stage": dict(seconds),
            "stage_check": stage_check(metrics),
            "encoder": "small ViT trained on the digits (stands in for DINOv2, whose weights cannot be downloaded here)",
        }

    def write_report(self, report: dict, sampling: SamplingResult, evaluation: EvaluationResult) -> Path:
        from mfrae.report import QualityRow, ReconstructionPanel, ReportFigures, SampleComparison, write_report

        titles = {"teacher": f"Teacher, {self.settings.teacher_nfe}-step Euler ODE", "cmt_1step": "CMT, 1 step",
                  "mfd_1step": "MFD, 1 step", "mfd_2step": "MFD, 2 steps", "mft_1step": "MFT, 1 step",
                  "mft_2step": "MFT, 2 steps"}
        comparison = SampleComparison("Samples of every model for the same requested classes",
                                      {titles[name]: images for name, images in sampling.samples.items()},
                                      sampling.labels, per_class=2)
        plans = _plans(self.settings.teacher_nfe)
        quality = [QualityRow(row["model"], row["nfe"], row["gflops_true"], row["fd"], row["class_accuracy"],
                              row["images_per_second"], family=plans[row["model"]][0])
                   for row in report["quality_vs_nfe"]]
        figures = ReportFigures(
            comparison=comparison,
            reconstructions=[ReconstructionPanel("RAE reconstructions (top: real digits, bottom: decoded latents)",
                                                 evaluation.real_images[:20], evaluation.reconstructions[:20],
                                                 ncols=10)],
            runs={stage: self.path(stage) for stage in ("decoder", "teacher", "cmt", "mfd", "mft")},
            quality=quality,
            fd_reference={"real digits (floor)": report["fd_floor"],
                          "RAE reconstructions": report["fd_reconstruction"]},
            stage_seconds=report["seconds_per_stage"],
        )
        note = (
            "Every stage of MF-RAE on scikit-learn's bundled digits, on a CPU. The representation encoder is a small "
            "ViT trained on the digits and frozen: it stands in for DINOv2, whose weights cannot be downloaded here; "
            "with real weights the same pipeline uses DINOv2. Quality is judged by a classifier trained only on real "
            "digits: Fréchet distance of its penultimate features against the test split, and the accuracy of its "
            "predictions against the requested classes. GFLOPs are true FLOPs per image (decoder included). "
            + " ".join(row["text"] for row in report["stage_check"])
        )
        return write_report(self.out, report, figures, title="mfrae demo: MeanFlow in RAE latent space", note=note).html


# Where the study explains when a MeanFlow stage can make the 1-step model worse than its init.
STAGE_CHECK_REASON = "docs/study.md#the-demo-and-the-evidence"


def stage_check(metrics: dict[str, dict]) -> list[dict]:
    """Each MeanFlow stage's 1-step FD against the stage it starts from (CMT -> MFD -> MFT): a stage that leaves
    the 1-step model worse is said so next to the number, with where the measured reason is written."""
    rows = []
    for stage, init in (("mfd", "cmt"), ("mft", "mfd")):
        fd, before = metrics[f"{stage}_1step"]["fd"], metrics[f"{init}_1step"]["fd"]
        worse = not fd <= before
        text = (f"{stage.upper()} 1-step FD {fd:.3g} against its {init.upper()} init's {before:.3g}: "
                + (f"worse by {fd - before:.3g} (the measured reason: {STAGE_CHECK_REASON})." if worse else "not worse."))
        rows.append({"stage": stage, "init": init, "fd_1step": fd, "init_fd_1step": before, "worse": worse,
                     "text": text})
    return rows


def _timed(seconds: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    """Run one stage (`fn` returns a result with a `summary`, or a tuple of them), record its wall time in
    `seconds[name]` and print its line."""
    start = time.perf_counter()
    result = fn()
    seconds[name] = time.perf_counter() - start
    summary = "; ".join(r.summary for r in result) if isinstance(result, tuple) else result.summary
    print(f"[{STAGE_ORDER.index(name)}/{len(STAGE_ORDER) - 1}] {name:10s} {seconds[name]:7.1f} s  {summary}", flush=True)
    return result


def _stack(dataset, limit: int | None = None) -> tuple[Tensor, Tensor]:
    n = len(dataset) if limit is None else min(limit, len(dataset))
    items = [dataset[i] for i in range(n)]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


#################################################################################
#                                   CLI                                         #
#################################################################################


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--fast", action="store_true", help="a quick version (about 3 minutes) for tests")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    demo = Demo(Path(args.out), FAST if args.fast else FULL, args.seed)
    result = demo.run_all()
    report = {**result.report, "seconds_total": time.perf_counter() - start, "mode": "fast" if args.fast else "full"}
    html = demo.write_report(report, result.sampling, result.evaluation)
    print(f"report: {html} and {html.with_suffix('.json')}  ({report['seconds_total']:.0f} s in all)")
    return 0
