"""`mfrae demo`: the whole MF-RAE pipeline on the bundled digits, on a CPU, evaluated, with a report.

    0. encoder    a small ViT trained on the digits, then frozen (stands in for DINOv2, whose weights cannot be
                  downloaded everywhere; with real weights the same pipeline uses DINOv2)
    1. decoder    RAE decoder (L1 + perceptual + GAN, noise-augmented), then the latent statistics
    2. teacher    flow-matching DiT^DH
    3. cmt        consistency mid-training on the teacher's 16-point Euler trajectories
    4. mfd        MeanFlow distillation from the teacher (finite-difference derivative)
    5. mft        MeanFlow bootstrapping with the one-point velocity
    6. sampling   teacher with many ODE steps, MeanFlow with 1 and 2 steps, decoded by the RAE decoder
    7. evaluation a judge classifier trained on real digits only: Fréchet distance of its penultimate features
                  and class accuracy of its predictions; `DIR/report.html` and `DIR/report.json`

Every training stage is the ordinary `mfrae train` engine on the `digits` preset with the overrides below;
each run directory under DIR can be inspected, resumed or sampled like any other. Running the demo again
reuses the finished stages and resumes an interrupted one.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mfrae.checkpoint import load_dit_dh, load_latent_stats, load_vit_decoder
from mfrae.data import DigitsDataset
from mfrae.flops import count_linear_macs, count_true_flops
from mfrae.models.dit_dh import DiTDH
from mfrae.models.rae import RAE
from mfrae.models.small_encoder import SmallViTEncoder
from mfrae.train.config import load_train_config
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
    overrides: dict[str, list[str]] = field(default_factory=dict)  # extra `--set` overrides per stage


# Full mode: about 13 minutes on 2 cores (measured settings and their choice: docs/demo.md). The teacher samples
# with 49 Euler evaluations on the 50-point grid of the released RAE sampler.
FULL = DemoSettings(
    encoder_steps=400, judge_steps=200, decoder_steps=1200, teacher_steps=1500, cmt_steps=1000, mfd_steps=300,
    mft_steps=200, num_samples=1000, teacher_nfe=49,
)
FAST = DemoSettings(
    encoder_steps=150, judge_steps=200, decoder_steps=200, teacher_steps=300, cmt_steps=60, mfd_steps=150,
    mft_steps=60, num_samples=200, teacher_nfe=16,
)

STAGE_ORDER = ("encoder", "decoder", "teacher", "cmt", "mfd", "mft", "sampling", "evaluation")


#################################################################################
#                                 Pipeline                                      #
#################################################################################


class Demo:
    def __init__(self, out: Path, settings: DemoSettings, seed: int = 0):
        self.out, self.settings, self.seed = out, settings, seed
        self.seconds: dict[str, float] = {}
        self.summaries: dict[str, str] = {}

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

    def _stage(self, index: int, name: str, fn) -> None:
        start = time.perf_counter()
        summary = fn()
        self.seconds[name] = time.perf_counter() - start
        self.summaries[name] = summary
        print(f"[{index}/{len(STAGE_ORDER) - 1}] {name:10s} {self.seconds[name]:7.1f} s  {summary}", flush=True)

    def _train(self, stage: str, steps: int, extra: list[str] | None = None) -> str:
        from mfrae.train.engine import train

        run = self.path(stage)
        overrides = [*self.common_overrides(), f"train.steps={steps}", *self.settings.overrides.get(stage, []),
                     *(extra or [])]
        cfg = load_train_config(stage, "digits", overrides)
        latest = RunDir(run).latest_checkpoint()
        if latest is not None and latest.name == f"step_{steps:08d}":
            return f"reused {run}"
        train(cfg, run, resume=latest is not None, command=["mfrae", "demo", stage])
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return f"{steps} steps, final loss {records[-1]['loss']:.4g}"

    # -- stages -----------------------------------------------------------------------------------

    def encoder(self) -> str:
        from mfrae.models.small_encoder import save_small_vit, train_small_vit

        path = self.path("encoder.safetensors")
        if path.exists():
            return f"reused {path}"
        network, stats = train_small_vit(DigitsDataset(split="train"), steps=self.settings.encoder_steps, seed=self.seed)
        save_small_vit(network, path)
        return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items())

    def decoder(self) -> str:
        from mfrae.stats import STATS_FILE, latent_statistics

        summary = self._train("decoder", self.settings.decoder_steps)
        stats_path = self.path("stats") / STATS_FILE
        if not stats_path.exists():
            from mfrae.checkpoint import save_latent_stats

            stats = latent_statistics(self.encoder_module(), DigitsDataset(split="train"), batch_size=128)
            save_latent_stats(stats, stats_path)
        return summary + "; latent statistics written"

    def encoder_module(self) -> SmallViTEncoder:
        return SmallViTEncoder(path=str(self.path("encoder.safetensors")))

    def run_all(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        s = self.settings
        self._stage(0, "encoder", self.encoder)
        self._stage(1, "decoder", self.decoder)
        self._stage(2, "teacher", lambda: self._train("teacher", s.teacher_steps))
        self._stage(3, "cmt", lambda: self._train("cmt", s.cmt_steps))
        self._stage(4, "mfd", lambda: self._train("mfd", s.mfd_steps, [f"model.init={self.path('cmt')}"]))
        self._stage(5, "mft", lambda: self._train("mft", s.mft_steps, [f"model.init={self.path('mfd')}"]))
        self._stage(6, "sampling", self.sampling)
        self._stage(7, "evaluation", self.evaluation)
        return self.report

    # -- sampling and evaluation ------------------------------------------------------------------

    def models(self) -> dict[str, DiTDH]:
        return {name: load_dit_dh(resolve_weights(self.path(name))).eval() for name in ("teacher", "cmt", "mfd", "mft")}

    def rae(self) -> RAE:
        return RAE(
            self.encoder_module(),
            load_vit_decoder(resolve_weights(self.path("decoder"))),
            load_latent_stats(resolve_weights(self.path("stats"))),
        ).eval()

    def sampling(self) -> str:
        from mfrae.sample import SampleSettings, generate

        s = self.settings
        rae, models = self.rae(), self.models()
        labels = torch.arange(s.num_samples) % 10
        teacher_cfg = load_train_config("teacher", "digits", self.common_overrides())
        shift = teacher_cfg.objective.get("shift", 1.0)
        plans = {  # name: (model, steps)
            "teacher": ("teacher", s.teacher_nfe),
            "cmt_1step": ("cmt", 1),
            "mfd_1step": ("mfd", 1),
            "mfd_2step": ("mfd", 2),
            "mft_1step": ("mft", 1),
            "mft_2step": ("mft", 2),
        }
        self.samples: dict[str, torch.Tensor] = {}
        self.speed: dict[str, float] = {}
        for name, (model_name, steps) in plans.items():
            settings = SampleSettings(steps=steps, batch_size=250, shift=shift)
            start = time.perf_counter()
            self.samples[name] = generate(models[model_name], rae, labels, settings, seed=self.seed + 1)
            self.speed[name] = s.num_samples / (time.perf_counter() - start)
        self.labels = labels
        ratio = self.speed["mfd_1step"] / self.speed["teacher"]
        return (f"{s.num_samples} images per model; teacher {self.speed['teacher']:.0f} img/s ({s.teacher_nfe} NFE), "
                f"1-step {self.speed['mfd_1step']:.0f} img/s ({ratio:.0f}x)")

    def evaluation(self) -> str:
        from mfrae.eval.judge import judge_metrics, judge_reference_stats, train_judge

        s = self.settings
        judge = train_judge(DigitsDataset(split="train"), steps=s.judge_steps, seed=self.seed)
        test = DigitsDataset(split="test")
        test_images, test_labels = _stack(test)
        reference = judge_reference_stats(judge, test_images)  # the real test split
        train_images, train_labels = _stack(DigitsDataset(split="train"), s.num_samples)
        with torch.no_grad():
            rae = self.rae()
            self.reconstructions = torch.cat([rae(train_images[i : i + 250]).clamp(0, 1) for i in range(0, len(train_images), 250)])
        # The floor: real training digits against the test split, the same sample size as the models.
        floor = judge_metrics(judge, train_images, train_labels, reference)
        recon = judge_metrics(judge, self.reconstructions, train_labels, reference)
        metrics = {name: judge_metrics(judge, images, self.labels, reference) for name, images in self.samples.items()}
        judge_accuracy = judge_metrics(judge, test_images, test_labels, reference)["class_accuracy"]
        self.real_images = train_images
        self.report = self._report(floor, recon, metrics, judge_accuracy)
        r = self.report
        return (f"FD floor {r['fd_floor']:.3g}, teacher {r['fd_teacher']:.3g}, MFD 1-step {r['fd_mfd_1step']:.3g}, "
                f"2-step {r['fd_mfd_2step']:.3g}; class accuracy MFD 1-step {r['class_acc_mfd_1step']:.3f}")

    def _costs(self) -> dict[str, float]:
        """Per-image GMACs (papers' convention) and true GFLOPs of the demo's backbone and decoder."""
        models, rae = self.models(), self.rae()
        mf, decoder = models["mfd"], rae.decoder
        x = torch.zeros(1, *mf.latent_shape)
        t, y = torch.ones(1), torch.zeros(1, dtype=torch.long)
        tokens = torch.zeros(1, decoder.config.num_patches, decoder.config.encoder_hidden_size)
        return {
            "backbone_gmacs": count_linear_macs(mf, x, t, y) * 1e-9,
            "backbone_gflops_true": count_true_flops(mf, x, t, y) * 1e-9,
            "decoder_gmacs": count_linear_macs(decoder, tokens) * 1e-9,
            "decoder_gflops_true": count_true_flops(decoder, tokens) * 1e-9,
        }

    def _report(self, floor: dict, recon: dict, metrics: dict, judge_accuracy: float) -> dict:
        s = self.settings
        costs = self._costs()
        nfe = {"teacher": s.teacher_nfe, "cmt_1step": 1, "mfd_1step": 1, "mfd_2step": 2, "mft_1step": 1, "mft_2step": 2}
        table = [
            {
                "model": name, "nfe": n,
                "gflops_true": costs["decoder_gflops_true"] + n * costs["backbone_gflops_true"],
                "gmacs": costs["decoder_gmacs"] + n * costs["backbone_gmacs"],
                "fd": metrics[name]["fd"], "class_accuracy": metrics[name]["class_accuracy"],
                "images_per_second": self.speed[name],
            }
            for name, n in nfe.items()
        ]
        report = {
            "fd_floor": floor["fd"],
            "fd_reconstruction": recon["fd"],
            "fd_teacher": metrics["teacher"]["fd"],
            "fd_cmt_1step": metrics["cmt_1step"]["fd"],
            "fd_mfd_1step": metrics["mfd_1step"]["fd"],
            "fd_mfd_2step": metrics["mfd_2step"]["fd"],
            "fd_mft_1step": metrics["mft_1step"]["fd"],
            "fd_mft_2step": metrics["mft_2step"]["fd"],
            "class_acc_teacher": metrics["teacher"]["class_accuracy"],
            "class_acc_mfd_1step": metrics["mfd_1step"]["class_accuracy"],
            "class_acc_mft_1step": metrics["mft_1step"]["class_accuracy"],
            "class_acc_mfd_2step": metrics["mfd_2step"]["class_accuracy"],
            "class_acc_real": floor["class_accuracy"],
            "judge_test_accuracy": judge_accuracy,
            "teacher_nfe": s.teacher_nfe,
            "num_samples": s.num_samples,
            "images_per_second": {
                "teacher": self.speed["teacher"], "1step": self.speed["mfd_1step"], "2step": self.speed["mfd_2step"],
            },
            "speedup_1step_vs_teacher": self.speed["mfd_1step"] / self.speed["teacher"],
            "costs_per_image": costs,
            "quality_vs_nfe": table,
            "seconds_per_stage": dict(self.seconds),
            "encoder": "small ViT trained on the digits (stands in for DINOv2, whose weights cannot be downloaded here)",
        }
        return report

    def write_report(self, report: dict) -> Path:
        from mfrae.report import ImagePanel, QualityRow, ReconstructionPanel, ReportFigures, write_report

        per_class = 10  # one row per class, ten samples each
        pick = torch.cat([torch.nonzero(self.labels == c).flatten()[:per_class] for c in range(10)])
        titles = {"teacher": f"Teacher, {self.settings.teacher_nfe}-step Euler ODE", "cmt_1step": "CMT, 1 step",
                  "mfd_1step": "MFD, 1 step", "mfd_2step": "MFD, 2 steps", "mft_1step": "MFT, 1 step",
                  "mft_2step": "MFT, 2 steps"}
        samples = [ImagePanel(titles[name], images[pick], self.labels[pick], ncols=per_class)
                   for name, images in self.samples.items()]
        quality = [QualityRow(row["model"], row["nfe"], row["gflops_true"], row["fd"], row["class_accuracy"],
                              row["images_per_second"]) for row in report["quality_vs_nfe"]]
        figures = ReportFigures(
            samples=samples,
            reconstructions=[ReconstructionPanel("RAE reconstructions (top: real digits, bottom: decoded latents)",
                                                 self.real_images[:20], self.reconstructions[:20], ncols=10)],
            runs={stage: self.path(stage) for stage in ("decoder", "teacher", "cmt", "mfd", "mft")},
            quality=quality,
            stage_seconds=report["seconds_per_stage"],
        )
        note = (
            "Every stage of MF-RAE on scikit-learn's bundled digits, on a CPU. The representation encoder is a small "
            "ViT trained on the digits and frozen: it stands in for DINOv2, whose weights cannot be downloaded here; "
            "with real weights the same pipeline uses DINOv2. Quality is judged by a classifier trained only on real "
            "digits: Fréchet distance of its penultimate features against the test split, and the accuracy of its "
            "predictions against the requested classes. GFLOPs are true FLOPs per image (decoder included)."
        )
        return write_report(self.out, report, figures, title="mfrae demo: MeanFlow in RAE latent space", note=note).html


def _stack(dataset, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
    report = demo.run_all()
    report["seconds_per_stage"] = dict(demo.seconds)  # now including the evaluation itself
    report["seconds_total"] = time.perf_counter() - start
    report["mode"] = "fast" if args.fast else "full"
    html = demo.write_report(report)
    print(f"report: {html} and {html.with_suffix('.json')}  ({report['seconds_total']:.0f} s in all)")
    return 0
