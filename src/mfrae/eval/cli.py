"""Fréchet distance, precision / recall and class accuracy of generated images against a reference set.

`mfrae eval --samples S --reference R --features NAME`. S and R are each an ADM-style .npz (`arr_0` uint8
NHWC, optional labels), a folder of PNG/JPEG images, or a feature-stats .npz (`mu`, `sigma`, written by
`--save-reference-stats` / `--save-sample-stats`). With a stats file only the Fréchet distance can be
computed: precision / recall need the features themselves, and the output says they were skipped.
Class accuracy is reported when the samples carry labels and the chosen extractor also classifies.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from mfrae.eval.features import FeatureExtractor, FeatureOptions, available_feature_extractors, build_feature_extractor
from mfrae.eval.metrics import FeatureStats, class_accuracy, precision_recall
from mfrae.eval.samples import ImageSet, load_images, save_adm_npz


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", help="generated images: .npz (arr_0 uint8 NHWC), image folder, or stats .npz")
    parser.add_argument("--reference", help="reference images (.npz or folder) or a precomputed stats .npz")
    parser.add_argument("--features", default="inception",
                        help=f"feature extractor: {', '.join(available_feature_extractors())} (default: inception)")
    parser.add_argument("--inception-weights", metavar="PATH",
                        help="local pt_inception-2015-12-05-6726825d.pth (default: $MFRAE_FID_INCEPTION)")
    parser.add_argument("--encoder", metavar="DIR", help="local Hugging Face encoder folder for --features encoder")
    parser.add_argument("--encoder-image-size", type=int, default=224, help="encoder input size (default: 224)")
    parser.add_argument("--pixels-size", type=int, default=32,
                        help="longer side of the downsampled image for --features pixels (default: 32)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per feature batch (default: 64)")
    parser.add_argument("--device", default="cpu", help="torch device for feature extraction (default: cpu)")
    parser.add_argument("--k", type=int, default=3, help="neighbour index for precision / recall (default: 3)")
    parser.add_argument("--save-reference-stats", metavar="PATH", help="write the reference feature stats (.npz)")
    parser.add_argument("--save-sample-stats", metavar="PATH", help="write the sample feature stats (.npz)")
    parser.add_argument("--export-adm", metavar="PATH", help="write the samples as an ADM evaluator .npz")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _is_stats_file(path: Path) -> bool:
    """An .npz holding `mu` and `sigma` but no images (`arr_0`) is a stats file."""
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(getattr(data, "files", ()))
    except (OSError, ValueError):
        return False  # let the image loader report what is wrong with it
    return {"mu", "sigma"} <= keys and "arr_0" not in keys


class _Side:
    """One input (samples or reference): its images and features, or only its precomputed stats."""

    def __init__(self, path: str, role: str, features: str) -> None:
        self.path = Path(path)
        self.role = role
        self.images: ImageSet | None = None
        self.features: np.ndarray | None = None
        self.predictions: np.ndarray | None = None
        if _is_stats_file(self.path):
            self.stats: FeatureStats | None = FeatureStats.load(self.path)
            if self.stats.features and self.stats.features != features:
                raise ValueError(f"{role} stats {self.path} were computed with features '{self.stats.features}', "
                                 f"not '{features}'")
        else:
            self.stats = None
            self.images = load_images(self.path)

    def compute(self, extractor: FeatureExtractor, name: str) -> None:
        if self.images is None:
            return
        out = extractor.extract(self.images.images)
        self.features, self.predictions = out.features, out.predictions
        if self.features.shape[0] < 2:
            raise ValueError(f"{self.role} {self.path}: need at least 2 images, got {self.features.shape[0]}")
        self.stats = FeatureStats.from_features(self.features, name=name)

    @property
    def count(self) -> int:
        if self.images is not None:
            return len(self.images)
        assert self.stats is not None
        return self.stats.n


def run(args: argparse.Namespace) -> int:
    if not args.samples and not args.reference:
        raise ValueError("give --samples and/or --reference")
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    samples = _Side(args.samples, "samples", args.features) if args.samples else None
    reference = _Side(args.reference, "reference", args.features) if args.reference else None

    if args.export_adm:
        if samples is None or samples.images is None:
            raise ValueError("--export-adm needs --samples to be images (an .npz with arr_0 or an image folder)")
        save_adm_npz(args.export_adm, samples.images.images, samples.images.labels)
    if args.save_reference_stats and (reference is None or reference.images is None):
        raise ValueError("--save-reference-stats needs --reference to be images")
    if args.save_sample_stats and (samples is None or samples.images is None):
        raise ValueError("--save-sample-stats needs --samples to be images")

    # Features are needed for metrics (both inputs given) or for writing stats; a bare export needs none.
    sides = [s for s in (samples, reference) if s is not None]
    wanted = len(sides) == 2 or args.save_reference_stats or args.save_sample_stats
    if wanted and any(s.images is not None for s in sides):
        options = FeatureOptions(device=args.device, batch_size=args.batch_size,
                                 inception_weights=args.inception_weights, encoder=args.encoder,
                                 encoder_image_size=args.encoder_image_size, pixels_size=args.pixels_size)
        extractor = build_feature_extractor(args.features, options)
        for side in sides:
            side.compute(extractor, args.features)
    if args.save_reference_stats:
        reference.stats.save(args.save_reference_stats)  # type: ignore[union-attr]
    if args.save_sample_stats:
        samples.stats.save(args.save_sample_stats)  # type: ignore[union-attr]

    result: dict[str, object] = {"features": args.features}
    notes: list[str] = []
    if samples is not None:
        result["num_samples"] = samples.count
    if reference is not None:
        result["num_reference"] = reference.count
    if samples is not None and reference is not None:
        s_stats, r_stats = samples.stats, reference.stats
        assert s_stats is not None and r_stats is not None
        if s_stats.mu.shape != r_stats.mu.shape:
            raise ValueError(f"feature dimensions differ: samples {samples.path} have {s_stats.mu.shape[0]}, "
                             f"reference {reference.path} has {r_stats.mu.shape[0]}")
        result["fd"] = s_stats.frechet_distance(r_stats)
        if samples.features is not None and reference.features is not None:
            pr = precision_recall(reference.features, samples.features, k=args.k)
            result.update(precision=pr.precision, recall=pr.recall, k=args.k)
        else:
            result.update(precision=None, recall=None)
            notes.append("precision/recall skipped: they need features of both sets, and a stats file has none")
    if samples is not None and samples.predictions is not None and samples.images is not None \
            and samples.images.labels is not None:
        result["class_accuracy"] = class_accuracy(samples.predictions, samples.images.labels)
    if args.export_adm:
        result["exported_adm"] = str(args.export_adm)
    if notes:
        result["notes"] = notes

    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            if key == "notes":
                for note in notes:
                    print(f"note: {note}")
            elif isinstance(value, float) and math.isfinite(value):
                print(f"{key}: {value:.6f}")
            elif value is None:
                print(f"{key}: skipped")
            else:
                print(f"{key}: {value}")
    return 0
