"""Evaluation during training: the Fréchet distance of EMA samples, measured as `mfrae sample` + `mfrae eval` do.

Every `eval.every` steps the engine calls the stage's evaluator with the EMA network. It draws
`eval.num_samples` class-balanced samples (the same labels and the same noise at every evaluation of a run:
both depend only on `eval.seed` and the sample index), split over the training processes, decodes them with
the RAE, extracts features with the named extractor of `mfrae.eval.features`, gathers them on every process
and returns the FD against the reference statistics (computed once, when the evaluator is built):

    MeanFlow stages   eval/fd_{n}step   for n in eval.steps          (n jumps, `meanflow_sample`)
    teacher           eval/fd_{n}nfe    for n in eval.teacher_steps  (n Euler steps on the training time grid)
    both              eval/class_acc_…  when the extractor also classifies (the digits judge)

With the FID Inception (`eval.features: inception`) the key names the FID convention next to the number,
`eval/fd_1step_fid-adm` (`eval.feature_options.fid_convention`, default `adm`; docs/evaluation.md), so that FIDs
of two conventions never share a curve; a reference stats file of another convention is refused when the
evaluator is built.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mfrae.distributed import DistInfo, gather_objects
from mfrae.eval.features import FeatureExtractor, FeatureOptions, build_feature_extractor
from mfrae.eval.metrics import FeatureStats, class_accuracy
from mfrae.eval.samples import load_images, to_uint8_nhwc
from mfrae.models.rae import RAE
from mfrae.generation import SampleSettings, class_labels, generate_indices
from mfrae.train.config import EvalConfig


def reference_statistics(spec: str, extractor: FeatureExtractor) -> FeatureStats:
    """Feature statistics of the reference: a stats .npz (`mu`, `sigma`) as it is, else images through `extractor`.
    Inception statistics of another FID convention than the extractor's are refused, naming the file."""
    path = Path(spec)
    if path.suffix == ".npz" and path.is_file():
        with np.load(path, allow_pickle=False) as data:
            if {"mu", "sigma"} <= set(data.files):
                stats = FeatureStats.load(path)
                if extractor.convention and stats.convention != extractor.convention:
                    raise ValueError(f"eval.reference {path} holds statistics of FID convention "
                                     f"'{stats.convention}', but the evaluator uses '{extractor.convention}' "
                                     "(eval.feature_options.fid_convention); they are not comparable")
                return stats
    stats = FeatureStats.from_features(extractor(load_images(path).images), extractor.name)
    return replace(stats, convention=extractor.convention)


def fd_key(suffix: str, convention: str) -> str:
    """The metric name of an FD: `eval/fd_{suffix}`, with `_fid-{convention}` appended for Inception FIDs."""
    return f"eval/fd_{suffix}" + (f"_fid-{convention}" if convention else "")


@dataclass
class SampleEvaluator:
    """evaluate(ema, step) -> {"eval/fd_1step": ..., ...}; see the module docstring."""

    cfg: EvalConfig
    rae: RAE
    num_classes: int
    plans: dict[str, SampleSettings]  # metric suffix -> how to sample
    info: DistInfo

    def __post_init__(self):
        options = FeatureOptions(**{"device": str(self.info.device), **self.cfg.feature_options})
        with self._own_rng():  # building feature networks must not move the training run's RNG
            self.extractor = build_feature_extractor(self.cfg.features, options)
            self.reference = reference_statistics(self.cfg.reference, self.extractor)
        self.labels = class_labels("equal", self.cfg.num_samples, self.num_classes, self.cfg.seed)
        self.mine = torch.arange(self.info.rank, self.cfg.num_samples, self.info.world_size)  # this process's share

    def _own_rng(self):
        return torch.random.fork_rng(devices=[self.info.device] if self.info.device.type == "cuda" else [])

    @torch.no_grad()
    def __call__(self, ema: nn.Module, step: int) -> dict[str, float]:
        with self._own_rng():
            return self._evaluate(ema)

    def _evaluate(self, ema: nn.Module) -> dict[str, float]:
        results: dict[str, float] = {}
        for suffix, settings in self.plans.items():
            images = generate_indices(ema, self.rae, self.labels, self.mine, settings, self.cfg.seed, self.info.device)
            extracted = self.extractor.extract(to_uint8_nhwc(images))
            shares = gather_objects((self.mine.numpy(), extracted.features, extracted.predictions), self.info)
            order = np.argsort(np.concatenate([s[0] for s in shares]))
            features = np.concatenate([s[1] for s in shares])[order]
            stats = FeatureStats.from_features(features, self.extractor.name)
            results[fd_key(suffix, self.extractor.convention)] = stats.frechet_distance(self.reference)
            if extracted.predictions is not None:
                predictions = np.concatenate([s[2] for s in shares])[order]
                results[f"eval/class_acc_{suffix}"] = class_accuracy(predictions, self.labels.numpy())
        return results


def meanflow_evaluator(cfg: EvalConfig, rae: RAE, num_classes: int, info: DistInfo) -> SampleEvaluator:
    base = SampleSettings(steps=1, batch_size=cfg.batch_size)
    plans = {f"{n}step": replace(base, steps=n) for n in cfg.steps}
    return SampleEvaluator(cfg, rae, num_classes, plans, info)


def teacher_evaluator(cfg: EvalConfig, rae: RAE, num_classes: int, shift: float, info: DistInfo) -> SampleEvaluator:
    base = SampleSettings(steps=1, batch_size=cfg.batch_size, shift=shift)
    plans = {f"{n}nfe": replace(base, steps=n) for n in cfg.teacher_steps}
    return SampleEvaluator(cfg, rae, num_classes, plans, info)
