"""Time of the Fréchet distance: symmetric eigendecompositions (`frechet_distance`) against scipy's `sqrtm` of
the non-symmetric product S1 S2 (`frechet_distance_sqrtm`, the ADM evaluator's and pytorch-fid's form), side by
side in one run, on the same statistics.

Run from a fresh clone (after `make install`):

    .venv/bin/python benchmarks/frechet.py                         # 2048-d, 100 samples a set, table
    .venv/bin/python benchmarks/frechet.py --json                  # one JSON object
    .venv/bin/python benchmarks/frechet.py --dim 64 --samples 20,200   # smoke run (tests/test_benchmarks.py)

(The script puts ../src on sys.path.) Each case draws two Gaussian feature sets of `n` samples in `dim`
dimensions (the second scaled by 1.2 and shifted by 0.1), fits mean and covariance, and times both forms of
the distance once, with `--threads` BLAS threads (default 1: on a shared CPU, spinning BLAS threads make
multi-thread timings meaningless); fewer samples than dimensions gives the singular covariances on which
`sqrtm` was slowest. It prints both values, their relative difference and the time ratio old / new.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before numpy's BLAS is loaded

SRC = Path(__file__).resolve().parents[1] / "src"


def _import_mfrae():
    try:
        import mfrae  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(SRC))


def _timed(fn, *args) -> tuple[float, float]:
    start = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency

    with threadpool_limits(limits=args.threads):  # the same BLAS threads for both forms
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    _import_mfrae()
    import numpy as np

    from mfrae.eval.metrics import FeatureStats, frechet_distance, frechet_distance_sqrtm

    rng = np.random.default_rng(args.seed)
    cases = {}
    for n in args.samples:
        a = FeatureStats.from_features(rng.standard_normal((n, args.dim)))
        b = FeatureStats.from_features(1.2 * rng.standard_normal((n, args.dim)) + 0.1)
        new, new_s = _timed(frechet_distance, a.mu, a.sigma, b.mu, b.sigma)
        old, old_s = _timed(frechet_distance_sqrtm, a.mu, a.sigma, b.mu, b.sigma)
        cases[str(n)] = {"n": n, "dim": args.dim, "fd_eigh": new, "fd_sqrtm": old,
                         "relative_difference": abs(new - old) / max(abs(old), 1e-300),
                         "seconds_eigh": new_s, "seconds_sqrtm": old_s, "ratio_old_vs_new": old_s / new_s}
    return {"dim": args.dim, "cases": cases}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=2048, help="feature dimension (default: 2048, FID's)")
    parser.add_argument("--samples", default="100", help="comma list of samples per set (default: 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads (default: 1)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        args.samples = [int(v) for v in args.samples.split(",")]
    except ValueError:
        parser.error(f"--samples must be a comma list of integers, got {args.samples!r}")
    if args.dim < 1 or min(args.samples) < 2 or args.threads < 1:
        parser.error("--dim and --threads must be >= 1 and every --samples value >= 2")
    report = run(args)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"Fréchet distance, {args.dim}-d: eigh (new) vs scipy sqrtm (old), same statistics, "
          f"{args.threads} BLAS thread(s)")
    print(f"{'n':>7}{'FD eigh':>16}{'FD sqrtm':>16}{'rel. diff':>11}{'eigh s':>9}{'sqrtm s':>9}{'old/new':>9}")
    for c in report["cases"].values():
        print(f"{c['n']:>7}{c['fd_eigh']:>16.6f}{c['fd_sqrtm']:>16.6f}{c['relative_difference']:>11.2e}"
              f"{c['seconds_eigh']:>9.2f}{c['seconds_sqrtm']:>9.2f}{c['ratio_old_vs_new']:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
