"""Accuracy of du/dt: the library's finite-difference stencil at several steps h and its JVP, in float32 and in bf16
autocast, against a float64 JVP of the same weights (MF-RAE arXiv 2511.13019 Table 3's claim, measured directly).

Run from a fresh clone (after `make install`):

    .venv/bin/python benchmarks/derivative_accuracy.py                 # testbeds 2-d and 64-d, DiT^DH-B at 768x16x16
    .venv/bin/python benchmarks/derivative_accuracy.py --size S --batch 4 --json   # one JSON object
    .venv/bin/python benchmarks/derivative_accuracy.py --tiny          # smoke run (seconds)

(The script puts ../src on sys.path.) Each testbed gives a network, inputs (z, r, t, y) with r < t and the tangent
v of MeanFlow's transport derivative du/dt = d_t u + v . grad_z u; `mfrae.flow.derivative_accuracy` calls the
library's `FiniteDifference(h)`, `FusedFiniteDifference(h)` and `JVP()` under each precision and compares their
du/dt with `JVP()` on a float64 copy (relative L2 error over the batch).

    mixture-<D>d   a Gaussian mixture in D dims (2-d: the toy's default; higher: 16 components, shared std 0.5),
                   a `ToyMeanFlowNet` student fitted for --fit-steps Adam steps to the mixture's exact velocity
                   (so |u| is of the velocity's size), v = the exact velocity at (z, t), z on the linear path
    dit-<size>     DiT^DH at the real latent shape 768 x 16 x 16 (ImageNet-256 RAE latents), random weights
                   (adaLN / output layers N(0, 0.02) instead of the zero init), the output layer then scaled so
                   that u has RMS --u-rms; z = (1 - t) x + t e and v = e - x with x, e ~ N(0, I)

Precisions: float32 (autocast off), tf32_emulated (float32 with every matmul / convolution / attention operand
rounded to TF32's 10-bit mantissa, as TF32 tensor cores do; the released MF-RAE scripts train in float32 with TF32
allowed) and bfloat16 (bf16 autocast), all on the CPU; `--precisions float32,tf32,bfloat16 --device cuda` uses the
real TF32 (the GPU check runs that). Mind what each strategy does: `finite_difference` (the library default)
always runs its stencil in float32 with TF32 off (so it is not measured under tf32_emulated, which cannot be
turned off for it: n/a), `finite_difference_fused` (the released MF-RAE layout) and `jvp` run in the caller's
precision. Results and their reading: docs/derivative_accuracy.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch / OpenMP is loaded

try:
    import mfrae  # noqa: F401
except ImportError:  # a fresh clone without `make install`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from mfrae.flow.derivative_accuracy import (DEFAULT_STEPS, PRECISIONS, applicable_methods, derivative_accuracy,
                                            reference_derivative)

DIT_SIZES = ("tiny", "S", "B", "L", "XL")
METHODS = ("jvp", "finite_difference", "finite_difference_fused")


def _mixture(dim: int, generator: torch.Generator):
    from mfrae.flow.toy import GaussianMixture

    if dim == 2:
        return GaussianMixture.default()
    means = 0.75 * torch.randn(16, dim, dtype=torch.float64, generator=generator)
    weights = 0.5 + torch.rand(16, dtype=torch.float64, generator=generator)
    return GaussianMixture(means, 0.5, weights)


def _times(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """t ~ U(0.05, 0.95), r = t * U(0, 0.95): every row has r < t."""
    t = 0.05 + 0.9 * torch.rand(batch, generator=generator)
    return t, t * 0.95 * torch.rand(batch, generator=generator)


def mixture_testbed(dim: int, batch: int, fit_steps: int, seed: int) -> tuple[str, tuple]:
    """A `ToyMeanFlowNet` fitted to a mixture's exact velocity, and (net, z, t, r, y, v) with v the exact velocity."""
    from mfrae.flow.toy import ToyMeanFlowNet

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mixture = _mixture(dim, gen)
    net = ToyMeanFlowNet(dim=dim, hidden=256, depth=3, num_classes=1)
    null = torch.full((512,), net.null_class, dtype=torch.long)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(fit_steps):
        x, e = mixture.sample(512, gen), torch.randn(512, dim, generator=gen)
        t, r = _times(512, gen)
        z = (1 - t[:, None]) * x + t[:, None] * e
        loss = (net(z, t, null, r=r) - mixture.velocity(z, t)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    x, e = mixture.sample(batch, gen), torch.randn(batch, dim, generator=gen)
    t, r = _times(batch, gen)
    z = (1 - t[:, None]) * x + t[:, None] * e
    y = torch.full((batch,), net.null_class, dtype=torch.long)
    text = (f"ToyMeanFlowNet (256 x 3) on a {dim}-d mixture of {mixture.num_components}, fitted {fit_steps} steps "
            f"to its velocity; v = exact velocity; batch {batch}")
    return text, (net, z, t, r, y, mixture.velocity(z, t))


def _dit_config(size: str):
    from mfrae.models.dit_dh import DiTDHConfig, dit_dh_config

    if size == "tiny":
        return DiTDHConfig(input_size=4, in_channels=8, hidden_size=(32, 48), depth=(2, 1), num_heads=(2, 2),
                           num_classes=10, interval_embedding=True)
    return dit_dh_config(size, input_size=16, interval_embedding=True)


def dit_testbed(size: str, batch: int, u_rms: float, seed: int) -> tuple[str, tuple]:
    """DiT^DH with random, non-zero adaLN / output weights, the output scaled to RMS `u_rms` on these inputs."""
    from mfrae.models.dit_dh import DiTDH

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = DiTDH(_dit_config(size)).eval()
    final = net.final_layer.linear
    with torch.no_grad():
        for module in [b.adaLN_modulation[-1] for b in net.blocks] + [net.final_layer.adaLN_modulation[-1], final]:
            torch.nn.init.normal_(module.weight, std=0.02, generator=gen)
    x = torch.randn(batch, *net.latent_shape, generator=gen)
    e = torch.randn(batch, *net.latent_shape, generator=gen)
    t, r = _times(batch, gen)
    tt = t.view(-1, 1, 1, 1)
    z = (1 - tt) * x + tt * e
    y = torch.randint(0, net.config.num_classes, (batch,), generator=gen)
    with torch.no_grad():
        rms = net(z, t, y, r=r).square().mean().sqrt()
        final.weight.mul_(u_rms / rms)
        final.bias.mul_(u_rms / rms)
    params = sum(p.numel() for p in net.parameters()) / 1e6
    c, hw = net.latent_shape[0], net.latent_shape[1]
    text = (f"DiT^DH-{size} ({params:.3g} M parameters) at {c} x {hw} x {hw}, random weights, output scaled to u "
            f"RMS {u_rms:g}; v = e - x; batch {batch}")
    return text, (net, z, t, r, y, e - x)


def measure(inputs: tuple, steps: tuple[float, ...], precisions: tuple[str, ...]) -> dict:
    """One testbed: the float64 reference once, then each precision; errors per strategy and precision."""
    net, z, t, r, y, v = inputs
    start = time.perf_counter()
    reference = reference_derivative(net, z, t, r, y, v)
    out = {"reference_seconds": time.perf_counter() - start, "precisions": {}}
    for precision in precisions:
        start = time.perf_counter()
        methods = [m for m in METHODS if m in applicable_methods(precision)]
        report = derivative_accuracy(net, z, t, r, y, v, steps=steps, precision=precision, methods=methods,
                                     reference=reference)
        out["precisions"][precision] = {**report.to_dict(), "seconds": time.perf_counter() - start}
    first = out["precisions"][precisions[0]]
    out["u_rms"], out["dudt_rms"] = first["u_rms"], first["dudt_rms"]
    return out


def format_table(name: str, result: dict) -> str:
    """Rows: strategy / h; columns: precisions."""
    precisions = list(result["precisions"])
    keys = list(dict.fromkeys(k for p in precisions for k in result["precisions"][p]["errors"]))
    lines = [f"{name}: {result['description']}",
             f"  reference: float64 JVP; u RMS {result['u_rms']:.3g}, du/dt RMS {result['dudt_rms']:.3g}",
             f"  {'strategy':<36}" + "".join(f"{p:>15}" for p in precisions)]
    for key in keys:
        cells = [result["precisions"][p]["errors"].get(key) for p in precisions]
        lines.append(f"  {key:<36}" + "".join(f"{c:>15.2e}" if c is not None else f"{'n/a':>15}" for c in cells))
    lines.append("  seconds: reference {:.1f}, ".format(result["reference_seconds"])
                 + ", ".join(f"{p} {result['precisions'][p]['seconds']:.1f}" for p in precisions))
    return "\n".join(lines)


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive numbers, got {text!r}")
    return values


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if min(values, default=1) < 1:
        raise argparse.ArgumentTypeError(f"dimensions must be >= 1, got {text!r}")
    return values


def _precisions(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = sorted(set(values) - set(PRECISIONS))
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"unknown precision(s) {unknown}; choose from {', '.join(PRECISIONS)}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=DIT_SIZES, default="B", help="DiT^DH size at 768 x 16 x 16 (default B); "
                   "tiny: a 8-channel 4 x 4 model for smoke runs")
    p.add_argument("--batch", type=int, default=2, help="DiT^DH batch (default 2)")
    p.add_argument("--no-dit", action="store_true", help="the mixture testbeds only")
    p.add_argument("--toy-dims", type=_ints, default=(2, 64), help="mixture dimensions (default 2,64; '' for none)")
    p.add_argument("--toy-batch", type=int, default=256, help="mixture batch (default 256)")
    p.add_argument("--fit-steps", type=int, default=300, help="Adam steps fitting the toy net (default 300)")
    p.add_argument("--steps", type=_floats, default=DEFAULT_STEPS, help="finite-difference steps h "
                   "(default 1e-4,1e-3,5e-3,1e-2)")
    p.add_argument("--precisions", type=_precisions, default=("float32", "tf32_emulated", "bfloat16"),
                   help="comma list of float32, tf32 (CUDA), tf32_emulated, bfloat16 (default "
                        "float32,tf32_emulated,bfloat16)")
    p.add_argument("--u-rms", type=float, default=1.0, help="RMS of the DiT^DH's u after scaling (default 1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="smoke run: tiny DiT^DH, mixtures 2-d and 8-d, 20 fit steps")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tiny:
        args.size, args.batch, args.toy_batch, args.fit_steps = "tiny", 2, 64, 20
        if args.toy_dims == (2, 64):
            args.toy_dims = (2, 8)
    if args.batch < 1 or args.toy_batch < 1 or args.fit_steps < 0:
        parser.error("--batch and --toy-batch must be >= 1, --fit-steps >= 0")
    if not args.u_rms > 0:
        parser.error(f"--u-rms must be > 0, got {args.u_rms}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    start = time.perf_counter()
    command = " ".join([".venv/bin/python", "benchmarks/derivative_accuracy.py", *map(shlex.quote, argv)])
    testbeds = [(f"mixture-{d}d", lambda d=d: mixture_testbed(d, args.toy_batch, args.fit_steps, args.seed))
                for d in args.toy_dims]
    if not args.no_dit:
        testbeds.append((f"dit-{args.size}", lambda: dit_testbed(args.size, args.batch, args.u_rms, args.seed)))
    report = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__,
              "threads": args.threads, "device": str(device), "steps": list(args.steps),
              "precisions": list(args.precisions), "testbeds": {}}
    if not args.json:
        print(f"command: {command}\ndate: {report['date']}; torch {torch.__version__}, {args.threads} threads, "
              f"{device}\nrelative L2 error of du/dt against the float64 JVP of the same weights\n", flush=True)
    for name, build in testbeds:
        description, inputs = build()
        net, *tensors = inputs
        net = net.to(device)
        inputs = (net, *(x.to(device) for x in tensors))
        result = {"description": description, **measure(inputs, args.steps, args.precisions)}
        report["testbeds"][name] = result
        if not args.json:
            print(format_table(name, result) + "\n", flush=True)
    report["seconds"] = time.perf_counter() - start
    if args.json:
        print(json.dumps(report))
    else:
        print(f"wall time {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
