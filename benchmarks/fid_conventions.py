"""FID of the same image sets under the three FID conventions (`adm`, `pytorch-fid`, `clean`), side by side.

Run from a fresh clone (after `make install`):

    .venv/bin/python benchmarks/fid_conventions.py                         # 32 and 256 px, 50 images a set
    .venv/bin/python benchmarks/fid_conventions.py --json                  # one JSON object
    .venv/bin/python benchmarks/fid_conventions.py --sizes 16 --num 6      # smoke run (tests/test_benchmarks.py)

(The script puts ../src on sys.path.) The image sets are scikit-learn's digits (grey, RGB-expanded) at each
size of `--sizes` (bicubic upsampling of the 8 x 8 originals): `reference` is the test split, `real` the
training split (the same distribution), `degraded` the training split with its contrast lowered to 0.85 and
Gaussian noise (std 16 of 255) added, a stand-in for generated samples. For each size and convention it
prints FID(real, reference) and FID(degraded, reference), and the ratios to `adm`; then the FID of two
conventions mixed, as when samples scored one way meet reference statistics made another way:
FID(degraded under pytorch-fid, reference under adm), and FID(reference under pytorch-fid, reference under
adm), which is 0 in any single convention.

Weights: `--inception-weights PATH` (pt_inception-2015-12-05-6726825d.pth) where a user has them; otherwise a
random Inception (seed `--seed`) whose BatchNorm statistics are fitted to its own activations on 16 reference
and 16 degraded images (one training-mode pass), so that features neither vanish nor explode. Random features
are not the real ones: the ratios say how much the conventions can matter, not the offset of real FIDs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch / OpenMP is loaded

SRC = Path(__file__).resolve().parents[1] / "src"
CONVENTIONS = ("adm", "pytorch-fid", "clean")


def _import_mfrae():
    try:
        import mfrae  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(SRC))


def image_sets(size: int, num: int, seed: int) -> dict:
    """uint8 NHWC digits sets {reference, real, degraded} of `num` images each at `size` px."""
    import numpy as np
    import torch

    from mfrae.data.digits import DigitsDataset
    from mfrae.eval.samples import to_uint8_nhwc

    sets = {}
    for name, split in (("reference", "test"), ("real", "train")):
        data = DigitsDataset(image_size=size, split=split, interpolation="bicubic")
        sets[name] = to_uint8_nhwc(torch.stack([data[i][0] for i in range(num)]))
    rng = np.random.default_rng(seed)
    noisy = 0.85 * sets["real"].astype(np.float64) + rng.normal(0.0, 16.0, sets["real"].shape)
    sets["degraded"] = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    return sets


def random_fid_state(images, seed: int) -> dict:
    """A random FID Inception state dict with BatchNorm statistics fitted to its own activations on `images`
    (uint8 NHWC, at most 32; one training-mode pass with momentum 1 under the adm convention)."""
    import torch

    from mfrae.eval.inception import FIDInceptionV3
    from mfrae.eval.samples import from_uint8_nhwc

    torch.manual_seed(seed)
    model = FIDInceptionV3()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 1.0
    with torch.no_grad():
        model.train()(from_uint8_nhwc(images[:32]))
    return model.state_dict()


def run(args: argparse.Namespace) -> dict:
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency

    with threadpool_limits(limits=args.threads):  # BLAS threads as torch's: no oversubscription on a busy CPU
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    _import_mfrae()
    import numpy as np
    import torch

    from mfrae.eval.features import FeatureOptions, build_feature_extractor
    from mfrae.eval.metrics import FeatureStats

    torch.set_num_threads(args.threads)
    report: dict = {"num": args.num, "weights": args.inception_weights or f"random (seed {args.seed})", "sizes": {}}
    for size in args.sizes:
        sets = image_sets(size, args.num, args.seed)
        weights = args.inception_weights
        if weights is None:
            weights = Path(args.workdir) / f"random_fid_inception_{size}.pth"
            half = min(16, args.num)  # fitted to clean and noisy images alike, so that neither explodes
            calibration = np.concatenate([sets["reference"][:half], sets["degraded"][:half]])
            torch.save(random_fid_state(calibration, args.seed), weights)
        stats, seconds = {}, {}
        for convention in CONVENTIONS:
            extractor = build_feature_extractor("inception", FeatureOptions(
                inception_weights=str(weights), fid_convention=convention, batch_size=args.batch_size))
            start = time.perf_counter()
            stats[convention] = {name: FeatureStats.from_features(extractor(images), "inception")
                                 for name, images in sets.items()}
            seconds[convention] = time.perf_counter() - start
        row: dict = {"conventions": {}}
        for convention in CONVENTIONS:
            s = stats[convention]
            row["conventions"][convention] = {
                "fid_real": s["real"].frechet_distance(s["reference"]),
                "fid_degraded": s["degraded"].frechet_distance(s["reference"]),
                "feature_seconds": seconds[convention],
            }
        adm = row["conventions"]["adm"]
        for convention, values in row["conventions"].items():
            values["ratio_real_vs_adm"] = values["fid_real"] / adm["fid_real"]
            values["ratio_degraded_vs_adm"] = values["fid_degraded"] / adm["fid_degraded"]
        mixed_degraded = stats["pytorch-fid"]["degraded"].frechet_distance(stats["adm"]["reference"])
        row["mixed"] = {
            "fid_degraded_pytorch_fid_vs_adm_reference": mixed_degraded,
            "ratio_mixed_vs_adm": mixed_degraded / adm["fid_degraded"],
            "fid_reference_pytorch_fid_vs_adm_reference": stats["pytorch-fid"]["reference"].frechet_distance(
                stats["adm"]["reference"]),
        }
        report["sizes"][str(size)] = row
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="32,256", help="comma list of image sizes in px (default: 32,256)")
    parser.add_argument("--num", type=int, default=50, help="images per set (default: 50)")
    parser.add_argument("--inception-weights", metavar="PATH", help="real FID Inception weights (default: random)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (default: 1)")
    parser.add_argument("--workdir", default=None, help="where random weights are written (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(v) for v in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes must be a comma list of integers, got {args.sizes!r}")
    if min(args.sizes) < 1 or args.num < 3 or min(args.batch_size, args.threads) < 1:
        parser.error("--sizes must be >= 1, --num >= 3, --batch-size and --threads >= 1")
    if args.workdir is None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            args.workdir = tmp
            report = run(args)
    else:
        report = run(args)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"FID under three conventions, {args.num} images a set, weights: {report['weights']}")
    print(f"{'size':>5} {'convention':<12}{'FID real':>12}{'/adm':>7}{'FID degraded':>14}{'/adm':>7}{'feat. s':>9}")
    for size, row in report["sizes"].items():
        for convention, v in row["conventions"].items():
            print(f"{size:>5} {convention:<12}{v['fid_real']:>12.4f}{v['ratio_real_vs_adm']:>7.3f}"
                  f"{v['fid_degraded']:>14.4f}{v['ratio_degraded_vs_adm']:>7.3f}{v['feature_seconds']:>9.1f}")
        m = row["mixed"]
        print(f"{size:>5} mixed: degraded (pytorch-fid) vs reference (adm) "
              f"{m['fid_degraded_pytorch_fid_vs_adm_reference']:.4f} ({m['ratio_mixed_vs_adm']:.3f} x adm); "
              f"reference vs itself across conventions {m['fid_reference_pytorch_fid_vs_adm_reference']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
