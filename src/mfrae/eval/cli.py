"""FID, sFID, Inception Score, precision / recall and class accuracy of generated images against a reference set.

`mfrae eval --samples S --reference R --features NAME`. S and R are each an ADM-style .npz (`arr_0` uint8
NHWC, optional labels), a folder of PNG/JPEG images, or a feature-stats .npz (`mu`, `sigma`, written by
`--save-reference-stats` / `--save-sample-stats`).

A reference .npz with precomputed `mu` / `sigma` (an ADM reference batch such as `VIRTUAL_imagenet256_labeled.npz`
holds them next to 10k images in `arr_0`, and `mu_s` / `sigma_s` for sFID) is scored against those statistics,
as the ADM evaluator does; its images still give the features for precision / recall. `--reference-images`
computes the reference statistics from its images instead. The output names which was used
(`reference_stats`: `precomputed` or `images`).

With `--features inception` (the default) the result holds `fid`, `sfid`, `inception_score`, `precision` and
`recall` (the protocol: docs/evaluation.md). With a stats file only the Fréchet distances can be computed:
precision / recall need the features themselves, and the output says they were skipped. Class accuracy is
reported when the samples carry labels and the chosen extractor also classifies.

Checks before anything is computed or written: every numeric option is positive; each input is readable (an
empty, truncated or renamed file is named with what is wrong); samples and reference have the same image
resolution wherever both are known (images, or stats files written by `--save-*-stats`, which record it; other
stats files carry none, and a note says the resolution was not checked); no output path is one of the inputs.
After feature extraction: sample labels outside the classifier's classes are refused. Output files are written
last, each atomically, so a failed evaluation leaves none behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from mfrae.eval.conventions import DEFAULT_FID_CONVENTION, FID_CONVENTIONS
from mfrae.eval.features import (
    FeatureExtractor,
    FeatureOptions,
    available_feature_extractors,
    build_feature_extractor,
    default_device,
)
from mfrae.eval.metrics import IS_SPLIT_SIZE, FeatureStats, class_accuracy, inception_score, precision_recall, sfid
from mfrae.eval.samples import ImageStream, load_images, npz_keys, open_images, save_adm_npz

PRECOMPUTED, FROM_IMAGES = "precomputed", "images"
PIXELS_SIZE = 16  # --features pixels: 768 features; 32 (3072) costs 9x to 20x as much for the same ranking


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", help="generated images: .npz (arr_0 uint8 NHWC), image folder, or stats .npz")
    parser.add_argument("--reference", help="reference images (.npz or folder), an ADM reference batch (images + "
                                            "precomputed mu/sigma, used as such) or a stats .npz")
    parser.add_argument("--reference-images", action="store_true",
                        help="compute the reference statistics from its images even when it has precomputed mu/sigma")
    parser.add_argument("--features", default="inception",
                        help=f"feature extractor: {', '.join(available_feature_extractors())} (default: inception)")
    parser.add_argument("--inception-weights", metavar="PATH",
                        help="local pt_inception-2015-12-05-6726825d.pth (default: $MFRAE_FID_INCEPTION)")
    parser.add_argument("--fid-convention", choices=FID_CONVENTIONS, default=DEFAULT_FID_CONVENTION,
                        help="resize to 299 and normalisation of --features inception: adm (the ADM evaluator's "
                             "TF graph; its reference batches' mu/sigma), pytorch-fid, clean (clean-fid) "
                             f"(default: {DEFAULT_FID_CONVENTION}; docs/evaluation.md)")
    parser.add_argument("--encoder", metavar="DIR", help="local Hugging Face encoder folder for --features encoder")
    parser.add_argument("--judge", metavar="FILE",
                        help="the digits judge for --features digits_judge (a demo run's judge.safetensors; "
                             "default: $MFRAE_DIGITS_JUDGE)")
    parser.add_argument("--rae", metavar="FOLDER_OR_HUB_ID",
                        help="for --features encoder: the encoder of a diffusers AutoencoderRAE (its pooled output, "
                             "input size and pixel normalisation)")
    parser.add_argument("--encoder-image-size", type=int, default=224, help="encoder input size (default: 224)")
    parser.add_argument("--pixels-size", type=int, default=PIXELS_SIZE,
                        help=f"longer side of the downsampled image for --features pixels (default: {PIXELS_SIZE}, "
                             "3 x 16 x 16 = 768 features). The cost grows with the cube of the feature count (the "
                             "Frechet distance's matrix functions): measured for 600 vs 600 images on 2 busy CPU "
                             "cores, the distance alone took about 10 s at 16 and 90 to 250 s at 32; digits with "
                             "more noise ranked in the same order at both sizes")
    parser.add_argument("--batch-size", type=int, default=64, help="images per feature batch (default: 64)")
    parser.add_argument("--device", default=None, help="torch device for feature extraction (default: cuda if "
                                                       "available, else cpu)")
    parser.add_argument("--k", type=int, default=3, help="neighbour index for precision / recall (default: 3)")
    parser.add_argument("--is-split-size", type=int, default=IS_SPLIT_SIZE,
                        help=f"samples per Inception Score split (default: {IS_SPLIT_SIZE}, as the ADM evaluator)")
    parser.add_argument("--save-reference-stats", metavar="PATH", help="write the reference feature stats (.npz)")
    parser.add_argument("--save-sample-stats", metavar="PATH", help="write the sample feature stats (.npz)")
    parser.add_argument("--export-adm", metavar="PATH", help="write the samples as an ADM evaluator .npz")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar during feature extraction")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


# ------------------------------------------------------------------------------------------------ inputs


def _npz_keys(path: Path) -> set[str]:
    """The member names of an .npz file (empty for a folder or a missing path: the image loader reports those);
    an unreadable file is refused here, naming it and what is wrong."""
    return set(npz_keys(path)) if path.is_file() else set()


class _Side:
    """One input (samples or reference): a stream of its images and/or its precomputed statistics.

    Precomputed `mu` / `sigma` (and `mu_s` / `sigma_s`) are used unless `use_images` is set and the file also
    holds images; images, when present, are always read for the per-image metrics (precision / recall, IS)."""

    def __init__(self, path: str, role: str, features: str, use_images: bool) -> None:
        self.path = Path(path)
        self.role = role
        keys = _npz_keys(self.path)
        has_stats = {"mu", "sigma"} <= keys
        if keys and not has_stats and "arr_0" not in keys:
            raise ValueError(f"{role} {self.path} holds neither images ('arr_0') nor feature statistics ('mu', "
                             f"'sigma'); its keys: {sorted(keys)}")
        self.stream: ImageStream | None = None if has_stats and "arr_0" not in keys else open_images(self.path)
        self.stats: FeatureStats | None = None
        self.spatial: FeatureStats | None = None
        self.stats_source: str | None = None
        self.features: np.ndarray | None = None
        self.predictions: np.ndarray | None = None
        self.num_classes: int | None = None
        self.score_logits: np.ndarray | None = None
        if has_stats and not (use_images and self.stream is not None):
            self.stats = FeatureStats.load(self.path)
            if self.stats.features and self.stats.features != features:
                raise ValueError(f"{role} stats {self.path} were computed with features '{self.stats.features}', "
                                 f"not '{features}'")
            if {"mu_s", "sigma_s"} <= keys:
                self.spatial = FeatureStats.load(self.path, suffix="_s")
            self.stats_source = PRECOMPUTED

    def compute(self, extractor: FeatureExtractor, name: str, progress: bool) -> None:
        if self.stream is None:
            return
        out = extractor.extract(self.stream, progress=f"{self.role} features" if progress else None)
        self.features, self.predictions, self.score_logits = out.features, out.predictions, out.score_logits
        self.num_classes = out.num_classes
        if self.features.shape[0] < 2:
            raise ValueError(f"{self.role} {self.path}: need at least 2 images, got {self.features.shape[0]}")
        if self.stats_source != PRECOMPUTED:
            stats = FeatureStats.from_features(self.features, name=name)
            self.stats = dataclasses.replace(stats, image_size=self.stream.size,  # recorded by --save-*-stats
                                             convention=extractor.convention)
            self.spatial = out.spatial
            self.stats_source = FROM_IMAGES

    @property
    def resolution(self) -> tuple[int, int] | None:
        """(H, W) of the images, or the one a stats file records (None: unknown)."""
        if self.stream is not None:
            return self.stream.size
        return self.stats.image_size if self.stats is not None else None

    @property
    def count(self) -> int:
        if self.stream is not None:
            return len(self.stream)
        assert self.stats is not None
        return self.stats.n

    def describe_stats(self) -> str:
        if self.stats_source == PRECOMPUTED:
            spatial = " and mu_s/sigma_s" if self.spatial is not None else ""
            return f"{self.role} statistics: the precomputed mu/sigma{spatial} stored in {self.path}"
        return f"{self.role} statistics: computed from the {self.count} images of {self.path}"


def _rae_encoder_options(spec: str, options: FeatureOptions) -> FeatureOptions:
    """Features from a diffusers AutoencoderRAE's encoder, at its own input size and pixel normalisation."""
    from mfrae.eval.features import PixelValuesCall
    from mfrae.models.rae import RAE

    encoder = RAE.from_pretrained(spec).encoder
    return dataclasses.replace(options, module=PixelValuesCall(encoder.model), encoder_image_size=encoder.input_size,
                               module_mean=tuple(encoder.image_mean.flatten().tolist()),
                               module_std=tuple(encoder.image_std.flatten().tolist()))


# ----------------------------------------------------------------------------------------------- metrics


def _distribution_metrics(samples: _Side, reference: _Side, args: argparse.Namespace, notes: list[str]) -> dict:
    """fd (and fid), sfid, precision / recall of the samples against the reference."""
    s_stats, r_stats = samples.stats, reference.stats
    assert s_stats is not None and r_stats is not None
    if s_stats.mu.shape != r_stats.mu.shape:
        hint = " (its precomputed mu/sigma; --reference-images computes them from its images)" \
            if reference.stats_source == PRECOMPUTED and reference.stream is not None else ""
        raise ValueError(f"feature dimensions differ: samples {samples.path} have {s_stats.mu.shape[0]}, "
                         f"reference {reference.path} has {r_stats.mu.shape[0]}{hint}")
    out: dict[str, object] = {"fd": s_stats.frechet_distance(r_stats)}
    if args.features == "inception":
        out["fid"] = out["fd"]
    if samples.spatial is not None and reference.spatial is not None:
        out["sfid"] = sfid(samples.spatial, reference.spatial)
    elif args.features == "inception" or samples.spatial is not None or reference.spatial is not None:
        out["sfid"] = None
        notes.append("sfid skipped: it needs spatial statistics of both sets (mu_s/sigma_s in a stats file)")
    if samples.features is not None and reference.features is not None:
        pr = precision_recall(reference.features, samples.features, k=args.k)
        out.update(precision=pr.precision, recall=pr.recall, k=args.k)
    else:
        out.update(precision=None, recall=None)
        notes.append("precision/recall skipped: they need features of both sets, and a stats file has none")
    return out


def _check_conventions(sides: list[_Side], args: argparse.Namespace) -> None:
    """Precomputed Inception statistics must have been made under --fid-convention: FIDs of two conventions
    differ by more than the gaps papers report (docs/evaluation.md)."""
    if args.features != "inception":
        return
    for side in sides:
        for stats in (side.stats, side.spatial):
            if stats is not None and stats.convention != args.fid_convention:
                raise ValueError(f"{side.role} stats {side.path} were computed under FID convention "
                                 f"'{stats.convention}', not '{args.fid_convention}' (--fid-convention); "
                                 "statistics of two conventions are not comparable")


def _print_text(result: dict[str, object], notes: list[str]) -> None:
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


def _check_options(args: argparse.Namespace) -> None:
    if not args.samples and not args.reference:
        raise ValueError("give --samples and/or --reference")
    if args.rae and (args.features != "encoder" or args.encoder):
        raise ValueError("--rae gives the features of --features encoder, instead of --encoder")
    if args.judge and args.features != "digits_judge":
        raise ValueError(f"--judge is the classifier of --features digits_judge, not of --features {args.features}")
    if args.judge and not Path(args.judge).is_file():
        raise ValueError(f"--judge {args.judge}: no such file")
    options = vars(args)
    for name in ("batch_size", "k", "is_split_size", "encoder_image_size", "pixels_size"):
        if options[name] < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {options[name]}")
    inputs = {Path(p).resolve() for p in (args.samples, args.reference) if p}
    for option in ("export_adm", "save_reference_stats", "save_sample_stats"):
        if options[option] and Path(options[option]).resolve() in inputs:
            raise ValueError(f"--{option.replace('_', '-')} {options[option]} is one of the inputs; "
                             "writing it would replace that file")


def _check_pair(samples: _Side, reference: _Side, args: argparse.Namespace, notes: list[str]) -> None:
    """The same image resolution on both sides where both are known, and more images than --k on each."""
    s_size, r_size = samples.resolution, reference.resolution
    if s_size is not None and r_size is not None and s_size != r_size:
        raise ValueError(f"resolution mismatch: samples {samples.path} are {s_size[0]}x{s_size[1]} images, "
                         f"reference {reference.path} is {r_size[0]}x{r_size[1]}; score samples against a "
                         "reference of their own resolution")
    for side, size in ((samples, s_size), (reference, r_size)):
        if size is None:
            notes.append(f"resolution not checked: {side.role} {side.path} holds statistics without an image size")
    if samples.stream is None or reference.stream is None:
        return  # no precision / recall: --k is not used
    for side in (samples, reference):
        if side.count <= args.k:
            raise ValueError(f"--k {args.k}: precision / recall need more than k images, and {side.role} "
                             f"{side.path} has {side.count}")


def _check_labels_in_range(samples: _Side, labels: np.ndarray, features: str) -> None:
    """Labels the classifier cannot predict would silently count as misses."""
    k = samples.num_classes
    assert k is not None
    bad = labels[(labels < 0) | (labels >= k)]
    if bad.size:
        raise ValueError(f"samples {samples.path}: label {int(bad[0])} is outside the {k} classes (0..{k - 1}) of "
                         f"the '{features}' classifier ({bad.size} of {labels.size} labels are)")


def run(args: argparse.Namespace) -> int:
    _check_options(args)
    samples = _Side(args.samples, "samples", args.features, use_images=True) if args.samples else None
    reference = _Side(args.reference, "reference", args.features, use_images=args.reference_images) \
        if args.reference else None
    if args.reference_images and (reference is None or reference.stream is None):
        raise ValueError("--reference-images needs --reference to hold images (an .npz with arr_0 or a folder)")
    if args.export_adm and (samples is None or samples.stream is None):
        raise ValueError("--export-adm needs --samples to be images (an .npz with arr_0 or an image folder)")
    if args.save_reference_stats and reference is None:
        raise ValueError("--save-reference-stats needs --reference")
    if args.save_sample_stats and (samples is None or samples.stream is None):
        raise ValueError("--save-sample-stats needs --samples to be images")
    notes: list[str] = []
    _check_conventions([s for s in (samples, reference) if s is not None], args)
    if samples is not None and reference is not None:
        _check_pair(samples, reference, args, notes)

    # Features are needed for metrics (both inputs given) or for writing stats; a bare export needs none.
    sides = [s for s in (samples, reference) if s is not None]
    wanted = len(sides) == 2 or args.save_reference_stats or args.save_sample_stats
    if wanted and any(s.stream is not None for s in sides):
        options = FeatureOptions(device=args.device or default_device(), batch_size=args.batch_size,
                                 inception_weights=args.inception_weights, fid_convention=args.fid_convention,
                                 encoder=args.encoder,
                                 encoder_image_size=args.encoder_image_size, pixels_size=args.pixels_size,
                                 extra={"judge": args.judge} if args.judge else {})
        if args.rae:
            options = _rae_encoder_options(args.rae, options)
        extractor = build_feature_extractor(args.features, options)
        for side in sides:
            side.compute(extractor, args.features, progress=not args.no_progress)

    result: dict[str, object] = {"features": args.features}
    if args.features == "inception":
        result["fid_convention"] = args.fid_convention  # fid, sfid, inception_score and precision/recall hold to it
    if samples is not None:
        result["num_samples"] = samples.count
    if reference is not None:
        result["num_reference"] = reference.count
    if samples is not None and reference is not None:
        result["reference_stats"] = reference.stats_source
        notes.append(reference.describe_stats())
        result.update(_distribution_metrics(samples, reference, args, notes))
    if samples is not None and samples.score_logits is not None:
        result["inception_score"] = inception_score(samples.score_logits, split_size=args.is_split_size)
        result["inception_score_split_size"] = args.is_split_size
    elif samples is not None and reference is not None and args.features == "inception":
        result["inception_score"] = None
        notes.append("inception_score skipped: it needs the sample images, and a stats file has none")
    labels = samples.stream.labels if samples is not None and samples.stream is not None else None
    if samples is not None and samples.predictions is not None and labels is not None:
        _check_labels_in_range(samples, labels, args.features)
        result["class_accuracy"] = class_accuracy(samples.predictions, labels)

    # Everything is computed: only now write the requested files (each atomically).
    if args.export_adm:
        images = load_images(samples.path)  # type: ignore[union-attr]
        save_adm_npz(args.export_adm, images.images, images.labels)
        result["exported_adm"] = str(args.export_adm)
    if args.save_reference_stats:
        reference.stats.save(args.save_reference_stats, spatial=reference.spatial)  # type: ignore[union-attr]
    if args.save_sample_stats:
        samples.stats.save(args.save_sample_stats, spatial=samples.spatial)  # type: ignore[union-attr]
    if notes:
        result["notes"] = notes

    if args.json:
        print(json.dumps(result))
    else:
        _print_text(result, notes)
    return 0
