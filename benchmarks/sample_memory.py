"""Peak host memory of `mfrae sample` against the number of samples: streamed shards keep it flat.

Run from a fresh clone (after `make install`):

    .venv/bin/python benchmarks/sample_memory.py                     # --sizes 2000,50000, table
    .venv/bin/python benchmarks/sample_memory.py --json              # one JSON object
    .venv/bin/python benchmarks/sample_memory.py --sizes 40,400      # smoke run (tests/test_benchmarks.py)

(The script puts ../src on sys.path.) A tiny digits-like pipeline with random weights (a MeanFlow DiT^DH on
64 x 4 x 4 latents and a ViT decoder to 32 x 32 RGB) is saved as mfrae model files; then each size runs as its
own `python -m mfrae sample --no-png` process, one after the other, and the peak resident set size of each child
is read from `os.wait4` (ru_maxrss, the child alone). `samples.npz` is written in pieces from the shards, so
the peak should depend on the batch size only: the ratio largest / smallest size should stay near 1, while
the uint8 images of the largest run (`uint8_mb`) would grow with the number of samples.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch / OpenMP is loaded

SRC = Path(__file__).resolve().parents[1] / "src"


def _import_mfrae():
    try:
        import mfrae  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(SRC))


def _save_models(root: Path) -> tuple[Path, Path]:
    """A random tiny digits-like MeanFlow student and decoder (small non-zero adaLN / output weights)."""
    import torch

    from mfrae.checkpoint import save_model
    from mfrae.models.dit_dh import DiTDH, DiTDHConfig
    from mfrae.models.vit_decoder import ViTDecoder, ViTDecoderConfig

    torch.manual_seed(0)
    student = DiTDH(DiTDHConfig(input_size=4, in_channels=64, hidden_size=(64, 96), depth=(2, 1), num_heads=(2, 2),
                                num_classes=10, interval_embedding=True))
    for m in [b.adaLN_modulation[-1] for b in student.blocks] + [student.final_layer.linear]:
        torch.nn.init.normal_(m.weight, std=0.02)
    decoder = ViTDecoder(ViTDecoderConfig(encoder_hidden_size=64, hidden_size=64, num_layers=2, num_heads=2,
                                          intermediate_size=128, patch_size=8, num_patches=16))
    return save_model(student, root / "student.safetensors"), save_model(decoder, root / "decoder.safetensors")


def _measure(num: int, student: Path, decoder: Path, out: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "mfrae", "sample", "--ckpt", str(student), "--decoder", str(decoder),
           "--num-samples", str(num), "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size),
           "--steps", "1", "--device", "cpu", "--no-png", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    stderr = child.stderr.read().decode(errors="replace")
    child.stderr.close()
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4; keep Popen from waiting again
    if child.returncode != 0:
        raise RuntimeError(f"mfrae sample --num-samples {num} failed ({child.returncode}):\n{stderr[-2000:]}")
    report = json.loads((out / "sampling.json").read_text())
    return {"num": num, "peak_rss_mb": usage.ru_maxrss / 1024, "seconds": seconds,
            "images_per_s": report["images_per_second"], "npz_mb": (out / "samples.npz").stat().st_size / 2**20,
            "uint8_mb": num * 32 * 32 * 3 / 2**20}


def run(args: argparse.Namespace) -> dict:
    _import_mfrae()
    with tempfile.TemporaryDirectory(prefix="sample_memory_") as tmp:
        root = Path(tmp)
        student, decoder = _save_models(root)
        rows = [_measure(n, student, decoder, root / f"n{n}", args) for n in args.sizes]
    small, large = rows[0], rows[-1]
    return {"batch_size": args.batch_size, "shard_size": args.shard_size, "threads": args.threads,
            "sizes": {str(r["num"]): r for r in rows},
            "peak_ratio_largest_vs_smallest": large["peak_rss_mb"] / small["peak_rss_mb"],
            "num_ratio_largest_vs_smallest": large["num"] / small["num"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="2000,50000", help="comma list of --num-samples values (ascending)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        args.sizes = sorted(int(v) for v in args.sizes.split(","))
    except ValueError:
        parser.error(f"--sizes must be a comma list of integers, got {args.sizes!r}")
    if len(args.sizes) < 2 or args.sizes[0] < 1 or min(args.batch_size, args.shard_size, args.threads) < 1:
        parser.error("--sizes needs at least two sizes >= 1; --batch-size, --shard-size and --threads must be >= 1")
    report = run(args)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"mfrae sample peak host memory: batch {args.batch_size}, shard {args.shard_size}, {args.threads} thread(s)")
    print(f"{'num':>8}{'peak RSS MB':>13}{'uint8 MB':>10}{'npz MB':>9}{'seconds':>9}{'images/s':>10}")
    for r in report["sizes"].values():
        print(f"{r['num']:>8}{r['peak_rss_mb']:>13.1f}{r['uint8_mb']:>10.1f}{r['npz_mb']:>9.1f}{r['seconds']:>9.1f}"
              f"{r['images_per_s']:>10.1f}")
    print(f"peak RSS ratio {report['peak_ratio_largest_vs_smallest']:.2f} for "
          f"{report['num_ratio_largest_vs_smallest']:.0f}x the samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
