"""Cost of one MeanFlow training step (forward + backward) of a DiT^DH, by derivative method.

Run from a fresh clone (after `make install`):

    .venv/bin/python benchmarks/train_step.py                # CPU: small preset, 2 threads, table
    .venv/bin/python benchmarks/train_step.py --json         # one JSON object
    .venv/bin/python benchmarks/train_step.py --preset tiny --steps 3
    .venv/bin/python benchmarks/train_step.py --preset imagenet256-xl --batch 32     # GPU: DiT^DH-XL, bf16
    .venv/bin/python benchmarks/train_step.py --preset tiny --steps 1 --warmup 0 --in-process   # smoke run

(The script puts ../src on sys.path, so `PYTHONPATH` is not needed.) Without `--preset` the run uses `small`
on CPU and `imagenet256-xl` (the released DiT^DH-XL shape, 768 x 16 x 16 latents, 1000 classes) on CUDA.
The XL preset is never built on a CPU unless asked for by name (3.4 GB of weights, minutes per step).

Variants, all through the library objectives on the same model, batch and random draws:

    fd              MeanFlowLoss(derivative="finite_difference"): autograd forward on B rows, the central
                    difference on the r != t rows as ONE no-grad forward of 2 x (those rows); MF-RAE's method,
                    our default.
    jvp             MeanFlowLoss(derivative="jvp"): torch.func.jvp (forward-mode AD, math attention) on the
                    r != t rows only, whose primal is the trained prediction; a plain forward on the r = t rows.
    jvp_full_batch  the official MeanFlow layout: torch.func.jvp over ALL B rows (primal = prediction, tangent
                    (w, 1, 0)), a `TimeDerivative` defined here; the r = t rows need no du/dt, so the numbers
                    equal `jvp`.
    fused           MeanFlowLoss(derivative="finite_difference_fused"): the official MF-RAE layout, one autograd
                    forward of the 3B batch [z, z + d w, z - d w] (gradients flow back through the whole graph).
    fm              FlowMatchingLoss: one forward + backward of B rows, the floor any MeanFlow step pays.

Ratios are against `fd`, measured in the same run. 25 % of rows have r != t (MeanFlow / MF-RAE default).

Timing: one fresh Python process builds the model once and runs the variants interleaved, round by round
(rotating the order), with `--threads` intra-op threads: after `--warmup` rounds, the median wall time of
`--steps` steps per variant, seeded identically in every variant. Interleaving keeps a busy machine from
favouring whichever variant happened to run in a quiet moment. The children run with OMP_WAIT_POLICY=PASSIVE
unless you set it: with OpenMP's default busy-waiting, a machine whose cores are shared with other work makes
every parallel region wait for a descheduled thread (we saw 10x slower steps with 2 threads on a busy 2-core
box, with the cost tracking the number of ops, not FLOPs); on an idle machine the two policies time alike.
On CUDA every timed step is bracketed by `torch.cuda.synchronize()`; `--precision bf16` (the CUDA default)
runs the objective under `torch.autocast(dtype=bfloat16)` as the training engine does.

The timing child runs with glibc's default allocator settings (the pinned mmap threshold below is for the
memory children only: it would make every large tensor a fresh mmap + page faults, adding 20-40 % system time).

Peak memory, on CPU: there are no allocator statistics, so we measure the peak resident set size (RSS) of a
process during one step, minus the RSS just before it:
  * a fresh process per variant, so no other variant's allocations or cached memory are counted;
  * glibc's mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_=131072, MALLOC_TRIM_THRESHOLD_=0), so large
    tensors are mmapped and returned to the OS when freed: the RSS before a step is the real baseline, not
    memory kept from the warm-up (glibc otherwise raises the threshold and keeps freed blocks on its heap);
  * after warm-up (which performs lazy one-time allocations: thread pools, kernels) the kernel's RSS high-water
    mark is reset (`echo 5 > /proc/self/clear_refs`), one step runs, and VmHWM (== getrusage maxrss) is read.
    Where clear_refs is not available the first step is measured instead, from getrusage maxrss before/after.
On CUDA: `torch.cuda.max_memory_allocated()` during one step minus `memory_allocated()` before it (fresh process
per variant as well). Either way the number is parameter gradients + activations kept for backward + transient
buffers, i.e. what the step adds on top of the model and data.

`--in-process` runs the timing and memory workers in the calling process instead of fresh children (a smoke run,
e.g. `main([...])` from tests/test_benchmarks.py: the memory figures then include what earlier variants left).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("fd", "jvp", "jvp_full_batch", "fused", "fm")

# name: (DiTDHConfig kwargs, default batch size). Class counts are part of the config.
PRESETS: dict[str, tuple[dict, int]] = {
    "tiny": ({"input_size": 4, "in_channels": 8, "hidden_size": (32, 48), "depth": (2, 1), "num_heads": (2, 2),
              "num_classes": 10}, 8),
    "small": ({"input_size": 8, "in_channels": 32, "hidden_size": (192, 384), "depth": (4, 1), "num_heads": (3, 6),
               "num_classes": 10}, 32),
    "S": ({"input_size": 16, "in_channels": 768, "hidden_size": (384, 2048), "depth": (12, 2), "num_heads": (6, 16),
           "num_classes": 10}, 4),
    # The released ImageNet-256 DiT^DH-XL (RAE, arXiv 2510.11690): 838.7M params (teacher), 156.8 GMACs per image.
    "imagenet256-xl": ({"input_size": 16, "in_channels": 768, "hidden_size": (1152, 2048), "depth": (28, 2),
                        "num_heads": (16, 16), "num_classes": 1000}, 32),
}
CPU_PRESETS = ("tiny", "small", "S")

TARGETS = {  # what this benchmark is judged on (CPU, small preset, 2 threads); "JVP" read both ways
    "speedup_vs_jvp": 1.3,
    "speedup_vs_jvp_full_batch": 1.3,
    "speedup_vs_fused": 1.5,
    "memory_vs_fused": 0.6,
}


def _import_mfrae():
    try:
        import mfrae  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


# ----------------------------------------------------------------------------------- workers


def full_batch_jvp():
    """A TimeDerivative: torch.func.jvp over every row (the official MeanFlow layout), its primal the prediction;
    the objective uses du/dt on the r != t rows only."""
    from mfrae.flow.objectives import TimeDerivative, jvp_with_primal

    class FullBatchJVP(TimeDerivative):
        def __call__(self, net, z, t, r, y, w, rows):
            u, dudt = jvp_with_primal(net, z, t, r, y, w)
            return u, rows.take(dudt)[0] if rows.count else None

    return FullBatchJVP()


def _setup(args: argparse.Namespace, variants: list[str]):
    """Model, data and one step function per variant (each a fresh objective over the same model)."""
    _import_mfrae()
    import contextlib

    import torch

    from mfrae.flow.objectives import FlowMatchingLoss, MeanFlowLoss
    from mfrae.flow.paths import dimension_shift
    from mfrae.models.dit_dh import DiTDH, DiTDHConfig

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    config_kwargs, default_batch = PRESETS[args.preset]
    batch = args.batch or default_batch
    torch.manual_seed(0)
    with torch.device(device):  # build in place: an XL model is never materialised on the host first
        net = DiTDH(DiTDHConfig(interval_embedding=True, **config_kwargs))
        for module in [b.adaLN_modulation[-1] for b in net.blocks] + [net.final_layer.adaLN_modulation[-1],
                                                                     net.final_layer.linear]:
            torch.nn.init.normal_(module.weight, std=0.02)  # a trained-looking net, not the zero init
        teacher = None
        if args.teacher:
            teacher = DiTDH(DiTDHConfig(interval_embedding=False, **config_kwargs)).eval().requires_grad_(False)
    net.train()
    shift = dimension_shift(net.latent_shape)
    x = torch.randn(batch, *net.latent_shape, device=device)
    y = torch.randint(0, net.num_classes, (batch,), device=device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def make_step(variant: str):
        if variant == "fm":
            objective = FlowMatchingLoss(shift=shift, null_class=net.null_class)
        else:
            derivative = {"fd": "finite_difference", "jvp": "jvp", "jvp_full_batch": "jvp",
                          "fused": "finite_difference_fused"}[variant]
            objective = MeanFlowLoss(teacher, shift=shift, fraction_r_neq_t=args.fraction, derivative=derivative,
                                     null_class=net.null_class)
            if variant == "jvp_full_batch":
                objective.time_derivative = full_batch_jvp()

        def step(i: int) -> float:
            torch.manual_seed(1000 + i)  # identical (t, r), masks and noise in every variant
            sync()
            start = time.perf_counter()
            with autocast:
                loss = objective(net, x, y, i).float().mean()
            loss.backward()
            sync()
            elapsed = time.perf_counter() - start
            net.zero_grad(set_to_none=True)
            return elapsed

        return step

    info = {"batch": batch, "params": sum(p.numel() for p in net.parameters()), "threads": args.threads,
            "device": str(device), "precision": args.precision,
            "device_name": torch.cuda.get_device_name(device) if cuda else "cpu"}
    return {v: make_step(v) for v in variants}, info


def memory_worker(args: argparse.Namespace) -> dict:
    """Fresh process, one variant: warm up, reset the peak statistic, run one step, read the peak."""
    steps, info = _setup(args, [args.memory_variant])
    step = steps[args.memory_variant]
    if args.device.startswith("cuda"):
        import torch

        for i in range(args.warmup):
            step(i)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(args.warmup)
        peak = torch.cuda.max_memory_allocated()
        return {"variant": args.memory_variant, "peak_memory_growth_mb": (peak - before) / 2**20,
                "memory_method": "cuda max_memory_allocated growth", **info}
    clear_refs = False
    if args.warmup > 0:
        for i in range(args.warmup):
            step(i)
        clear_refs = _reset_peak_rss()
    before = _status_kb("VmRSS") if clear_refs else _maxrss_kb()
    step(args.warmup)
    peak = _status_kb("VmHWM") if clear_refs else _maxrss_kb()
    return {"variant": args.memory_variant, "peak_memory_growth_mb": (peak - before) / 1024,
            "memory_method": "clear_refs+VmHWM" if clear_refs else "maxrss growth over the first step", **info}


def time_worker(args: argparse.Namespace) -> dict:
    """One process, all variants interleaved round by round, so a busy machine slows all of them alike."""
    variants = args.time_variants.split(",")
    steps, info = _setup(args, variants)
    for i in range(args.warmup):
        for v in variants:
            steps[v](i)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for k in range(args.steps):
        order = variants[k % len(variants):] + variants[: k % len(variants)]  # rotate who goes first
        for v in order:
            times[v].append(steps[v](args.warmup + k))
    return {"ms_per_step": {v: 1e3 * statistics.median(t) for v, t in times.items()},
            "ms_all": {v: [round(1e3 * s, 1) for s in t] for v, t in times.items()}, **info}


# ----------------------------------------------------------------------------------- driver


def _child(args: argparse.Namespace, extra: list[str], pin_mmap: bool) -> dict:
    """Run a worker (`extra` = ["--time-worker", "v1,v2"] or ["--memory-worker", "v"]) in a fresh child process,
    or in this one with --in-process."""
    if args.in_process:
        flag, value = extra
        worker = argparse.Namespace(**{**vars(args), "time_variants": None, "memory_variant": None})
        if flag == "--time-worker":
            worker.time_variants = value
            return time_worker(worker)
        worker.memory_variant = value
        return memory_worker(worker)
    env = dict(os.environ)
    if pin_mmap:  # memory children only: the timing child keeps glibc's default (adaptive) allocator
        env.update(MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="0")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--preset", args.preset, "--threads", str(args.threads),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--fraction", str(args.fraction),
           "--device", args.device, "--precision", args.precision, *extra]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    if args.teacher:
        cmd.append("--teacher")
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {extra} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _resolve_defaults(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.device == "auto":
        args.device = "cuda" if _cuda_available() else "cpu"
    if args.device.startswith("cuda") and not _cuda_available():
        parser.error("--device cuda: no CUDA device is available")
    on_cpu = args.device == "cpu"
    if args.preset is None:
        args.preset = "small" if on_cpu else "imagenet256-xl"
    if args.precision is None:
        args.precision = "fp32" if on_cpu else "bf16"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="model size (default: small on CPU, imagenet256-xl on CUDA)")
    parser.add_argument("--batch", type=int, default=None, help="override the preset's batch size")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="bf16 autocast or fp32 (default: fp32 on CPU, bf16 on CUDA as the training engine)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--fraction", type=float, default=0.25, help="fraction of rows with r != t")
    parser.add_argument("--teacher", action="store_true",
                        help="MFD with a same-size frozen teacher (adds one no-grad forward to every MeanFlow variant)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset of " + ",".join(VARIANTS))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--in-process", action="store_true",
                        help="run the workers in this process, not in fresh children (smoke runs; memory less clean)")
    parser.add_argument("--memory-worker", choices=VARIANTS, dest="memory_variant", help=argparse.SUPPRESS)
    parser.add_argument("--time-worker", dest="time_variants", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.threads < 1 or args.warmup < 0 or not 0.0 <= args.fraction <= 1.0:
        parser.error("--steps and --threads must be >= 1, --warmup >= 0, --fraction in [0, 1]")
    if args.batch is not None and args.batch < 1:
        parser.error("--batch must be >= 1")
    _resolve_defaults(args, parser)
    if args.memory_variant:  # child processes
        print(json.dumps(memory_worker(args)))
        return 0
    if args.time_variants:
        print(json.dumps(time_worker(args)))
        return 0

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or "fd" not in variants:
        parser.error(f"--variants must include fd and only {VARIANTS}, got {variants}")
    if args.device == "cpu" and args.preset not in CPU_PRESETS:
        print(f"warning: preset {args.preset} on a CPU allocates several GB and takes minutes per step",
              file=sys.stderr)
    load_before = os.getloadavg()[0]
    timing = _child(args, ["--time-worker", ",".join(variants)], pin_mmap=False)
    results = {}
    for v in variants:
        memory = _child(args, ["--memory-worker", v], pin_mmap=True)
        ms = timing["ms_per_step"][v]
        results[v] = {"ms_per_step": ms, "samples_per_s": timing["batch"] * 1e3 / ms, "ms_all": timing["ms_all"][v],
                      "peak_memory_growth_mb": memory["peak_memory_growth_mb"],
                      "memory_method": memory["memory_method"]}
    load_after = os.getloadavg()[0]
    fd = results["fd"]
    for r in results.values():
        r["time_vs_fd"] = r["ms_per_step"] / fd["ms_per_step"]
        r["memory_vs_fd"] = (r["peak_memory_growth_mb"] / fd["peak_memory_growth_mb"]
                             if fd["peak_memory_growth_mb"] > 0 else None)
    summary = {}
    for name in ("jvp", "jvp_full_batch", "fused"):
        if name in results:
            summary[f"speedup_vs_{name}"] = results[name]["ms_per_step"] / fd["ms_per_step"]
    if "fused" in results and results["fused"]["peak_memory_growth_mb"] > 0:
        summary["memory_vs_fused"] = fd["peak_memory_growth_mb"] / results["fused"]["peak_memory_growth_mb"]
    report = {"preset": args.preset, "batch": timing["batch"], "params": timing["params"], "threads": args.threads,
              "device": timing["device"], "device_name": timing["device_name"], "precision": args.precision,
              "fraction_r_neq_t": args.fraction, "teacher": args.teacher, "steps": args.steps,
              "warmup": args.warmup, "load_average_before": load_before, "load_average_after": load_after,
              "cpu_count": os.cpu_count(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
              "variants": results, "summary": summary, "targets": TARGETS,
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.json:
        print(json.dumps(report))
        return 0
    memory_label = "peak RSS +MB" if args.device == "cpu" else "peak alloc +MB"
    where = f"{args.threads} threads" if args.device == "cpu" else timing["device_name"]
    print(f"DiT^DH preset {args.preset}: {timing['params'] / 1e6:.2f}M params, batch {timing['batch']}, "
          f"{args.device} ({where}), {args.precision}, {args.fraction:.0%} rows r != t, "
          f"teacher={'yes' if args.teacher else 'no'}, median of {args.steps} steps "
          f"(load average before / after: {load_before:.2f} / {load_after:.2f})")
    print(f"{'variant':<16}{'ms/step':>10}{'samples/s':>11}{'x fd':>8}{memory_label:>16}{'x fd':>8}")
    for name, r in results.items():
        mem_ratio = f"{r['memory_vs_fd']:.2f}" if r["memory_vs_fd"] is not None else "n/a"
        print(f"{name:<16}{r['ms_per_step']:>10.1f}{r['samples_per_s']:>11.1f}{r['time_vs_fd']:>8.2f}"
              f"{r['peak_memory_growth_mb']:>16.1f}{mem_ratio:>8}")
    for key, value in summary.items():
        target = TARGETS.get(key)
        if target is None:
            print(f"{key:<26} {value:6.2f}")
            continue
        ok = value >= target if key.startswith("speedup") else value <= target
        sign = ">=" if key.startswith("speedup") else "<="
        print(f"{key:<26} {value:6.2f}   (target {sign} {target}: {'met' if ok else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
