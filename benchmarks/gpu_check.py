"""The GPU check: every CUDA figure the project tracks, measured in one run and written to one JSON file + a log.

Normally started by `benchmarks/gpu_check.sh`, which runs the CUDA tests first (`pytest -m cuda`) and hands their
JUnit file to this script:

    bash benchmarks/gpu_check.sh out/gpu_check                         # on a CUDA machine, < 8 minutes
    python benchmarks/gpu_check.py --out out/gpu_check                 # the measurements alone (7 min budget)
    python benchmarks/gpu_check.py --out /tmp/g --dry-run              # measures nothing: the JSON schema only
    python benchmarks/gpu_check.py --out /tmp/g --tiny --device cpu --compile-backend aot_eager   # CPU smoke run

Needs only torch, numpy and scipy next to mfrae (`pip install --no-deps -e .` or PYTHONPATH=src): every model is
built from `mfrae.models` with random weights, nothing is downloaded, transformers / safetensors / pyyaml are not
imported. A missing module is named in one line and recorded in the JSON.

Sections, in order (each runs in a fresh child process with a hard time limit, so a torch.compile error, an
out-of-memory or a hang is recorded as that section's error and the next section still runs):

    matmul_peak                  bf16 8192^3 matmul TFLOP/s (CUDA events, median of rounds): the MFU denominator;
                                 fp32 and TF32 figures as well
    train_step                   the XL MFD training step in bf16 autocast as the engine runs it (MeanFlowLoss with
                                 a frozen XL teacher, finite-difference derivative, prefix layout; clip, fused AdamW,
                                 EMA): ms/step, samples/s, peak memory, counted FLOPs, MFU; at each --train-batches
                                 with the engine's float32 matmul setting (the float32 stencil runs without TF32),
                                 then the largest batch once more with TF32 allowed
    sampling_256                 1- and 2-step 256 px images/s with decoding, bf16 and fp32, eager
    sampling_512                 1-step 512 px images/s, bf16 and fp32, eager
    sampling_256_compiled_bf16   as sampling_256 with torch.compile (student and decoder, as `mfrae sample --compile`)
    sampling_256_compiled_fp32
    derivative_accuracy          relative error of du/dt on DiT^DH-XL at 768 x 16 x 16 (random weights, u RMS 1,
                                 batch 4): the library's finite difference (float32 stencil) and the released
                                 fused layout at h = 1e-4 .. 1e-2, and the JVP, in float32 (TF32 off), float32 with
                                 TF32 matmuls / convolutions (and the CPU emulation of TF32 beside it, to check it),
                                 and bf16 autocast, against a float64 JVP (`mfrae.flow.derivative_accuracy`,
                                 docs/derivative_accuracy.md)
    train_step_compiled          the training step with the student compiled (engine `train.compile`)

Budget: sections get cumulative shares of `--budget-s` (time a section leaves unused passes to the next); a
section whose time is gone is recorded as skipped. Inside a section, timed repeats stop early (after at least
one) when its time runs short, and results are saved variant by variant, so a killed section keeps what it had.

Images/s ("end to end") follow `mfrae sample`: per-sample noise drawn on the host by `prefetched_noise` in a
thread, `generate_batch` (the sampler, RAE decode, clamp, copy of the float images to the host), batches of
`--sample-batch`, the first batch (warm-up, compilation) excluded. "device" images/s time the same sampler +
decode on noise already on the GPU with CUDA events, without the host copy: the GPU's part alone.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections import deque
from dataclasses import dataclass
from pathlib import Path

SCHEMA = "mfrae-gpu-check/1"
REPO = Path(__file__).resolve().parents[1]

TARGETS = {
    "train_mfu": 0.45,  # model FLOPs utilisation of the XL bf16 MFD step against the measured bf16 matmul peak
    "mf1_256_images_per_s": 725.0,  # half the H200's bf16 limit for 544.8 true GFLOPs per 1-step 256 px image
}

# (steps, precision) of each sampling section
SAMPLING_VARIANTS: dict[str, tuple[tuple[int, str], ...]] = {
    "sampling_256": ((1, "bf16"), (2, "bf16"), (1, "fp32"), (2, "fp32")),
    "sampling_512": ((1, "bf16"), (1, "fp32")),
    "sampling_256_compiled_bf16": ((1, "bf16"), (2, "bf16")),
    "sampling_256_compiled_fp32": ((1, "fp32"), (2, "fp32")),
}
TRAIN_VALUES = ("batch", "ms_per_step", "samples_per_s", "peak_memory_gib", "flops_per_step", "achieved_tflops",
                "mfu", "mfu_tf32")

# derivative_accuracy: strategies (mfrae name: short name), finite-difference steps, and per precision of
# mfrae.flow.derivative_accuracy its short name and the strategies measured (the CPU emulation of TF32 runs beside
# the real one, to validate it; it cannot measure the library stencil, which turns TF32 off)
DERIVATIVE_METHODS = {"jvp": "jvp", "finite_difference": "fd", "finite_difference_fused": "fused"}
DERIVATIVE_STEPS = (1e-4, 1e-3, 5e-3, 1e-2)
DERIVATIVE_PRECISIONS = {
    "float32": ("fp32", tuple(DERIVATIVE_METHODS)),
    "tf32": ("tf32", tuple(DERIVATIVE_METHODS)),
    "tf32_emulated": ("tf32emu", ("jvp", "finite_difference_fused")),
    "bfloat16": ("bf16", tuple(DERIVATIVE_METHODS)),
}


def _derivative_key(method: str, step: float | None, precision: str) -> str:
    """The values key of one measurement, e.g. fd_h5e-3_bf16 (library stencil, h = 5e-3, bf16 autocast)."""
    short = DERIVATIVE_PRECISIONS[precision][0]
    name = DERIVATIVE_METHODS[method]
    if step is None:
        return f"{name}_{short}"
    mantissa, exponent = f"{step:.0e}".split("e")
    return f"{name}_h{mantissa}e{int(exponent)}_{short}"


DERIVATIVE_VALUES = tuple(_derivative_key(m, h, p) for p, (_, methods) in DERIVATIVE_PRECISIONS.items()
                          for m in methods for h in ((None,) if m == "jvp" else DERIVATIVE_STEPS))


def _sampling_values(section: str) -> tuple[str, ...]:
    keys = []
    for steps, precision in SAMPLING_VARIANTS[section]:
        keys += [f"mf{steps}_{precision}_images_per_s", f"mf{steps}_{precision}_device_images_per_s"]
    return tuple(keys)


# Every section of the report and the keys of its "values" (null until measured). Measured sections in run
# order with their share of the budget; cuda_tests comes from gpu_check.sh's JUnit file.
VALUES: dict[str, tuple[str, ...]] = {
    "cuda_tests": ("total", "passed", "failed", "errors", "skipped", "pytest_rc"),
    "matmul_peak": ("bf16_tflops", "fp32_tflops", "tf32_tflops", "n"),
    "train_step": TRAIN_VALUES,
    "sampling_256": _sampling_values("sampling_256"),
    "sampling_512": _sampling_values("sampling_512"),
    "sampling_256_compiled_bf16": _sampling_values("sampling_256_compiled_bf16"),
    "sampling_256_compiled_fp32": _sampling_values("sampling_256_compiled_fp32"),
    "derivative_accuracy": DERIVATIVE_VALUES,
    "train_step_compiled": TRAIN_VALUES,
}
SHARES: dict[str, float] = {
    "matmul_peak": 0.04,
    "train_step": 0.15,
    "sampling_256": 0.20,
    "sampling_512": 0.10,
    "sampling_256_compiled_bf16": 0.22,
    "sampling_256_compiled_fp32": 0.22,
    "derivative_accuracy": 0.06,
    "train_step_compiled": 0.07,  # last: not one of the figures, gets what the others leave
}
MEASURED = tuple(SHARES)
STATUSES = ("ok", "error", "timeout", "skipped")
MIN_SECTION_S = 25.0  # a section gets at least this (budget permitting): start-up, CUDA init, building XL models

# What the check imports: mfrae's models, flow and generation modules need these next to torch.
REQUIRED_MODULES = ("torch", "numpy", "scipy")
MFRAE_MODULES = ("mfrae.models.dit_dh", "mfrae.models.vit_decoder", "mfrae.models.rae", "mfrae.flow.objectives",
                 "mfrae.flow.samplers", "mfrae.generation", "mfrae.flops")
# Reported only (module: distribution): what the rest of mfrae and the test run use.
OTHER_MODULES = {"pytest": "pytest", "yaml": "PyYAML", "safetensors": "safetensors", "transformers": "transformers",
                 "tqdm": "tqdm", "PIL": "pillow", "timm": "timm", "torchvision": "torchvision"}
DISTRIBUTIONS = {"torch": "torch", "numpy": "numpy", "scipy": "scipy", **OTHER_MODULES}


def _import_mfrae() -> None:
    if importlib.util.find_spec("mfrae") is None:
        sys.path.insert(0, str(REPO / "src"))


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _json_safe(value):
    """Non-finite floats become null: the report stays strict JSON."""
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_json_safe(data), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _error_text(err: BaseException) -> str:
    """One line naming the exception, then the end of its traceback (kept short for the JSON)."""
    lines = traceback.format_exception(type(err), err, err.__traceback__)
    return f"{type(err).__name__}: {err}".strip()[:500] + "\n" + "".join(lines[-3:])[-1500:]


#################################################################################
#                                Model sizes                                    #
#################################################################################


@dataclass(frozen=True)
class Sizes:
    """The shapes a run measures: the released XL pipeline, or a tiny one for CPU smoke runs."""

    tiny: bool
    matmul_n: int
    train_batches: tuple[int, ...]
    compiled_train_batch: int
    sample_batch: int
    sample_512_batch: int

    def dit(self, resolution: int, interval: bool):
        from mfrae.models.dit_dh import DiTDHConfig, dit_dh_config

        grid = resolution // 16 if not self.tiny else resolution // 64  # 256 px -> 16 x 16 latents (4 x 4 tiny)
        if self.tiny:
            return DiTDHConfig(input_size=grid, in_channels=8, hidden_size=(32, 48), depth=(2, 1), num_heads=(2, 2),
                               num_classes=10, interval_embedding=interval)
        return dit_dh_config("XL", input_size=grid, interval_embedding=interval)

    def decoder(self, resolution: int):
        from mfrae.models.vit_decoder import ViTDecoderConfig, vit_decoder_config

        tokens = (resolution // 16) ** 2 if not self.tiny else (resolution // 64) ** 2
        if self.tiny:
            return ViTDecoderConfig(encoder_hidden_size=8, hidden_size=32, num_layers=2, num_heads=2,
                                    intermediate_size=64, patch_size=4, num_patches=tokens)
        return vit_decoder_config("XL", num_patches=tokens)


def _sizes(args: argparse.Namespace) -> Sizes:
    if args.tiny:
        return Sizes(True, 256, tuple(args.train_batches or (4,)), args.compiled_train_batch or 4,
                     args.sample_batch or 4, args.sample_512_batch or 2)
    return Sizes(False, 8192, tuple(args.train_batches or (32, 64, 128)), args.compiled_train_batch or 64,
                 args.sample_batch or 256, args.sample_512_batch or 64)


#################################################################################
#                       Measurement helpers (child side)                        #
#################################################################################


class Clock:
    """Seconds of one call: CUDA events on a GPU (no host round trip inside), perf_counter on a CPU."""

    def __init__(self, device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def time(self, fn) -> float:
        import torch

        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def _repeats(clock: Clock, fn, repeats: int, until: float) -> list[float]:
    """Up to `repeats` timed calls, stopping after the first one that ends past `until` (time.monotonic)."""
    seconds = []
    for _ in range(max(1, repeats)):
        seconds.append(clock.time(fn))
        if time.monotonic() > until:
            break
    return seconds


class Child:
    """One section in its own process: its device, sizes, soft deadline and the file it saves results to."""

    def __init__(self, args: argparse.Namespace):
        import torch

        self.args = args
        self.device = torch.device(args.device)
        self.clock = Clock(self.device)
        self.sizes = _sizes(args)
        self.start = time.monotonic()
        # Leave a fifth of the hard limit for the last repeat and the final write.
        self.deadline = self.start + 0.8 * args.child_seconds
        self.out = Path(args.child_out)
        self.record = {"status": "running", "values": {k: None for k in VALUES[args.child]}, "details": {}}

    def share_until(self, remaining_parts: int) -> float:
        """A soft deadline for the next of `remaining_parts` equal parts of the time left."""
        now = time.monotonic()
        return now + max(0.0, self.deadline - now) / max(1, remaining_parts)

    def save(self) -> None:
        _atomic_write_json(self.out, self.record)


def _trained_looking_(net) -> None:
    """Small random adaLN / output weights instead of the zero init, so no kernel sees all-zero data."""
    import torch

    for module in [b.adaLN_modulation[-1] for b in net.blocks] + [net.final_layer.adaLN_modulation[-1],
                                                                 net.final_layer.linear]:
        torch.nn.init.normal_(module.weight, std=0.02)


def _per_sample_flops(config, interval: bool) -> int:
    """True FLOPs (2 per multiply-add, attention included) of one forward of one sample, on the meta device."""
    import torch

    from mfrae.flops import count_true_flops
    from mfrae.models.dit_dh import DiTDH

    with torch.device("meta"):
        net = DiTDH(config).eval()
        x, t, y = torch.zeros(1, *net.latent_shape), torch.ones(1), torch.zeros(1, dtype=torch.long)
        return count_true_flops(net, x, t, y, torch.zeros(1)) if interval else count_true_flops(net, x, t, y)


def _decoder_flops(config) -> int:
    import torch

    from mfrae.flops import count_true_flops
    from mfrae.models.vit_decoder import ViTDecoder

    with torch.device("meta"):
        decoder = ViTDecoder(config).eval()
        return count_true_flops(decoder, torch.zeros(1, config.num_patches, config.encoder_hidden_size))


# ----------------------------------------------------------------------------------------- matmul peak


def section_matmul_peak(child: Child) -> None:
    """Big square matmuls, 10 back to back per timed round, median over rounds."""
    import torch

    n = child.sizes.matmul_n
    cuda = child.clock.cuda
    rows = {}
    plans = [("bf16", torch.bfloat16, n, False), ("fp32", torch.float32, n // 2, False)]
    if cuda:
        plans.append(("tf32", torch.float32, n, True))
    for i, (name, dtype, size, tf32) in enumerate(plans):
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            gen = torch.Generator(device=child.device).manual_seed(i)
            a = torch.randn(size, size, device=child.device, dtype=dtype, generator=gen)
            b = torch.randn(size, size, device=child.device, dtype=dtype, generator=gen)
            c = torch.empty(size, size, device=child.device, dtype=dtype)

            def ten():
                for _ in range(10):
                    torch.mm(a, b, out=c)

            for _ in range(2 if child.sizes.tiny else 5):  # warm-up: cuBLAS handle, kernel choice, clocks up
                child.clock.time(ten)
            seconds = _repeats(child.clock, ten, 7 if child.sizes.tiny else 20, child.share_until(len(plans) - i))
            flops = 10 * 2 * size**3
            rows[name] = {"n": size, "tflops_median": flops / statistics.median(seconds) / 1e12,
                          "tflops_best": flops / min(seconds) / 1e12, "round_seconds": seconds}
            del a, b, c
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        child.record["values"].update({f"{k}_tflops": v["tflops_median"] for k, v in rows.items()}, n=n)
        child.record["details"] = {"method": "torch.mm of random square matrices, 10 per round timed with "
                                             "CUDA events (perf_counter on a CPU), median over 20 rounds after 5 "
                                             "warm-up rounds",
                                   "by_dtype": rows}
        child.save()


# ----------------------------------------------------------------------------------------- training step


def section_train_step(child: Child, compiled: bool) -> None:
    import torch

    from mfrae.flow.objectives import MeanFlowLoss, finite_difference_derivative
    from mfrae.flow.paths import TimeDistribution, dimension_shift
    from mfrae.models.dit_dh import DiTDH
    from torch.utils.flop_counter import FlopCounterMode

    device, clock, sizes, args = child.device, child.clock, child.sizes, child.args
    cuda = clock.cuda
    student_cfg, teacher_cfg = sizes.dit(256, True), sizes.dit(256, False)
    torch.manual_seed(0)
    with torch.device(device):  # built in place: an XL model is never materialised on the host
        student = DiTDH(student_cfg)
        teacher = DiTDH(teacher_cfg).eval().requires_grad_(False)
    _trained_looking_(student)
    _trained_looking_(teacher)
    student.train()
    # The shipped mfd stage (configs/imagenet256-xl.yaml) with the engine's bf16 autocast.
    objective = MeanFlowLoss(teacher, time=TimeDistribution.uniform(0.0, 0.999),
                             shift=dimension_shift(student.latent_shape), fraction_r_neq_t=0.25,
                             r_neq_t_layout="prefix", derivative="finite_difference", fd_step=5e-3, adaptive_p=1.0,
                             label_dropout=0.1, null_class=student.null_class)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                                  fused=cuda or None)  # as the engine
    ema = [p.detach().clone() for p in params]
    model = torch.compile(student, backend=args.compile_backend) if compiled else student

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16)

    f_student, f_teacher = _per_sample_flops(student_cfg, True), _per_sample_flops(teacher_cfg, False)
    child.record["details"] = {
        "model": {"student": student_cfg.to_dict(), "student_params": sum(p.numel() for p in params),
                  "teacher_params": sum(p.numel() for p in teacher.parameters())},
        "objective": "MeanFlowLoss(teacher, time=uniform[0, 0.999], shift=sqrt(CHW/4096), fraction_r_neq_t=0.25, "
                     "r_neq_t_layout=prefix, derivative=finite_difference, fd_step=5e-3, adaptive_p=1, "
                     "label_dropout=0.1) under bf16 autocast; then clip_grad_norm_(1.0), AdamW(fused on CUDA), "
                     "EMA lerp, as mfrae.train.engine",
        "compiled": compiled, "compile_backend": args.compile_backend if compiled else None,
        "flops_counting": (
            "flops_per_step = matmul + attention FLOPs (2 per multiply-add) counted by "
            "torch.utils.flop_counter.FlopCounterMode over one executed objective + backward on the device: the "
            "trained student forward and its backward, the no-grad float32 finite-difference forward of 2 x the "
            "r != t rows, and the frozen teacher's forward; optimizer, clipping, EMA and elementwise work are not "
            "counted. analytic = B (3 f_student + f_teacher) + 2 k f_student (backward ~ 2 x forward; k = r != t "
            "rows) from per-sample forward counts on the meta device. mfu = flops_per_step / step time / the "
            "measured bf16 matmul peak (section matmul_peak); the stencil's FLOPs run in float32 and count at "
            "face value."),
        "per_sample_forward_flops": {"student": f_student, "teacher": f_teacher},
        "configs": [],
    }

    def step(x, y, i):
        with autocast():
            loss = objective(model, x, y, i).float().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - 0.9999)

    batches = [sizes.compiled_train_batch] if compiled else list(sizes.train_batches)
    # every batch at the engine's float32 matmul setting, then (eager) the largest that ran once more with TF32
    plans = [(b, False) for b in batches]
    if not compiled:
        plans.append((None, True))
    for i, (batch, tf32) in enumerate(plans):
        if batch is None:
            ran = [r["batch"] for r in child.record["details"]["configs"] if "ms_per_step" in r]
            if not ran:
                break
            batch = max(ran)
        row = {"batch": batch, "matmul_precision": "tf32" if tf32 else "float32 (engine default)"}
        child.record["details"]["configs"].append(row)
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            until = child.share_until(len(plans) - i)
            gen = torch.Generator(device=device).manual_seed(batch)
            x = torch.randn(batch, *student.latent_shape, device=device, generator=gen)
            y = torch.randint(0, student.num_classes, (batch,), device=device, generator=gen)
            warm_start = time.perf_counter()
            for k in range(args.train_warmup):  # optimizer state, allocator, kernel choice (and compilation)
                step(x, y, k)
            clock.sync()
            row["warmup_seconds"] = time.perf_counter() - warm_start
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            counter = iter(range(args.train_warmup, 10**9))
            seconds = _repeats(clock, lambda: step(x, y, next(counter)), args.train_steps, until)
            ms = 1e3 * statistics.median(seconds)
            row.update(ms_per_step=ms, ms_all=[round(1e3 * s, 2) for s in seconds], samples_per_s=batch * 1e3 / ms)
            if cuda:
                row.update(peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30,
                           memory_before_step_gib=before / 2**30,
                           peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30)
            else:
                row.update(peak_memory_gib=None, memory_note="CPU: no allocator statistics")
            # Counted on the eager student (same FLOPs; the counter does not see inside compiled graphs).
            with FlopCounterMode(display=False) as flop_counter:
                with autocast():
                    loss = objective(student, x, y, 0).float().mean()
                loss.backward()
            optimizer.zero_grad(set_to_none=True)
            flops = flop_counter.get_total_flops()
            gap = objective.pairs.num_gap_rows(batch)
            analytic = batch * (3 * f_student + f_teacher) + 2 * gap * f_student
            row.update(flops_per_step=flops, flops_per_step_analytic=analytic, gap_rows=gap,
                       achieved_tflops=flops / (ms / 1e3) / 1e12)
            # Where the time goes: the float32 stencil alone and the teacher's forward alone.
            t = torch.rand(gap, device=device, generator=gen)
            r = t * torch.rand(gap, device=device, generator=gen)
            w = torch.randn(gap, *student.latent_shape, device=device, generator=gen)

            def stencil():
                with autocast():
                    finite_difference_derivative(student, x[:gap], t, r, y[:gap], w)

            def teacher_forward():
                with torch.no_grad(), autocast():
                    teacher(x, torch.rand(batch, device=device, generator=gen), y)

            if gap:
                row["stencil_ms"] = 1e3 * statistics.median([clock.time(stencil) for _ in range(3)])
            row["teacher_forward_ms"] = 1e3 * statistics.median([clock.time(teacher_forward) for _ in range(3)])
            del x, y
        except Exception as err:  # noqa: BLE001 - recorded, the other configurations go on
            row["error"] = _error_text(err)
            optimizer.zero_grad(set_to_none=True)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        if cuda and "error" in row:  # after the except block: its traceback no longer holds the tensors
            torch.cuda.empty_cache()
        _train_values(child.record)
        child.save()


def _train_values(record: dict) -> None:
    """Headline values: the configuration with the most samples/s at the engine's float32 matmul setting; the
    MFU values are filled in by the parent (it holds the matmul peak)."""
    rows = [r for r in record["details"]["configs"] if "ms_per_step" in r]
    default = [r for r in rows if r["matmul_precision"] != "tf32"]
    if not default:
        return
    best = max(default, key=lambda r: r["samples_per_s"])
    record["values"].update({k: best.get(k) for k in ("batch", "ms_per_step", "samples_per_s", "peak_memory_gib",
                                                      "flops_per_step", "achieved_tflops")})


# ----------------------------------------------------------------------------------------- sampling


def section_sampling(child: Child, resolution: int, compiled: bool) -> None:
    import torch

    from mfrae.flow.samplers import meanflow_sample
    from mfrae.generation import SampleSettings, batches, class_labels, generate_batch, prefetched_noise
    from mfrae.models.dit_dh import DiTDH
    from mfrae.models.rae import RAE, LatentStats
    from mfrae.models.vit_decoder import ViTDecoder

    device, clock, sizes, args = child.device, child.clock, child.sizes, child.args
    section = args.child
    batch = sizes.sample_batch if resolution == 256 else sizes.sample_512_batch
    dit_cfg, dec_cfg = sizes.dit(resolution, True), sizes.decoder(resolution)
    torch.manual_seed(0)
    with torch.device(device):
        student = DiTDH(dit_cfg).eval()
        decoder = ViTDecoder(dec_cfg).eval()
        stats = LatentStats(torch.zeros(student.latent_shape), torch.ones(student.latent_shape))
    _trained_looking_(student)
    rae = RAE(None, decoder, stats).to(device).eval()  # decode-only with latent statistics, as `mfrae sample`
    model = student
    if compiled:  # what `mfrae sample --compile` does
        model, rae.decoder = (torch.compile(student, backend=args.compile_backend),
                              torch.compile(decoder, backend=args.compile_backend))
    f_backbone, f_decoder = _per_sample_flops(dit_cfg, True), _decoder_flops(dec_cfg)
    child.record["details"] = {
        "resolution": resolution, "batch": batch, "compiled": compiled,
        "compile_backend": args.compile_backend if compiled else None,
        "model": {"student": dit_cfg.to_dict(), "decoder": dec_cfg.to_dict()},
        "true_gflops_per_image": {"backbone": f_backbone / 1e9, "decoder": f_decoder / 1e9},
        "method": "end to end as `mfrae sample`: prefetched per-sample host noise, generate_batch (sampler, decode, "
                  "clamp, copy to host), first batch excluded, wall clock; device: sampler + decode on device noise, "
                  "CUDA events, no host copy. bf16 = backbone and decoder under bf16 autocast "
                  "(--bf16 --decoder-bf16); fp32 = neither",
        "variants": {},
    }
    variants = SAMPLING_VARIANTS[section]
    labels = class_labels("equal", batch * (1 + args.sample_repeats), student.num_classes, 0)
    for i, (steps, precision) in enumerate(variants):
        name = f"mf{steps}_{precision}"
        bf16 = precision == "bf16"
        row = {"nfe": steps, "precision": precision, "batch": batch,
               "true_gflops_per_image": (steps * f_backbone + f_decoder) / 1e9}
        child.record["details"]["variants"][name] = row
        try:
            until = child.share_until(2 * (len(variants) - i))  # end to end and device parts
            settings = SampleSettings(steps=steps, batch_size=batch, bf16=bf16, decoder_bf16=bf16)
            pieces = list(batches(range(batch * (1 + args.sample_repeats)), batch))
            noise = prefetched_noise(student.latent_shape, pieces, seed=i, prefetch=device.type != "cpu")
            try:
                warm_start = time.perf_counter()
                generate_batch(model, rae, labels[pieces[0].start:pieces[0].stop], pieces[0], settings, i, None,
                               device, next(noise))
                row["warmup_seconds"] = time.perf_counter() - warm_start
                timed, start = 0, time.perf_counter()
                for piece in pieces[1:]:  # each ends with the copy to the host: no extra sync needed
                    images = generate_batch(model, rae, labels[piece.start:piece.stop], piece, settings, i, None,
                                            device, next(noise))
                    timed += images.shape[0]
                    if time.monotonic() > until:
                        break
                seconds = time.perf_counter() - start
            finally:
                noise.close()
            row.update(images_per_s=timed / seconds, seconds_per_batch=seconds * batch / timed, timed_images=timed)
            child.record["values"][f"{name}_images_per_s"] = row["images_per_s"]
            child.save()

            gen = torch.Generator(device=device).manual_seed(i)
            z0 = torch.randn(batch, *student.latent_shape, device=device, generator=gen)
            y = labels[:batch].to(device)

            @torch.inference_mode()
            def on_device():  # the device part of generate_batch
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    z = meanflow_sample(model, z0, y, steps=steps)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    rae.decode(z.float()).float().clamp(0, 1)

            until = child.share_until(2 * (len(variants) - i) - 1)
            device_s = statistics.median(_repeats(clock, on_device, args.sample_repeats, until))
            row.update(device_images_per_s=batch / device_s, device_seconds_per_batch=device_s,
                       device_achieved_tflops=batch * row["true_gflops_per_image"] / device_s / 1e3)
            child.record["values"][f"{name}_device_images_per_s"] = row["device_images_per_s"]
        except Exception as err:  # noqa: BLE001 - recorded, the other variants go on
            row["error"] = _error_text(err)
        if clock.cuda and "error" in row:  # after the except block: its traceback no longer holds the tensors
            torch.cuda.empty_cache()
        child.save()


# ----------------------------------------------------------------------------------------- derivative accuracy


def section_derivative_accuracy(child: Child) -> None:
    """du/dt of the MeanFlow student (DiT^DH-XL, tiny on a CPU) from each time-derivative strategy under each
    precision, against the float64 JVP of the same weights (`mfrae.flow.derivative_accuracy`)."""
    import torch

    from mfrae.flow.derivative_accuracy import derivative_accuracy, reference_derivative, strategy_label
    from mfrae.models.dit_dh import DiTDH

    device, sizes = child.device, child.sizes
    config = sizes.dit(256, True)
    batch = 2 if sizes.tiny else 4
    torch.manual_seed(0)
    with torch.device(device):
        net = DiTDH(config).eval().requires_grad_(False)
    _trained_looking_(net)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, *net.latent_shape, device=device, generator=gen)
    e = torch.randn(batch, *net.latent_shape, device=device, generator=gen)
    t = 0.05 + 0.9 * torch.rand(batch, device=device, generator=gen)
    r = t * 0.95 * torch.rand(batch, device=device, generator=gen)
    y = torch.randint(0, config.num_classes, (batch,), device=device, generator=gen)
    z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * e
    with torch.no_grad():  # output scaled so that u has RMS 1, the size of a velocity on normalised latents
        rms = net(z, t, y, r=r).float().square().mean().sqrt()
        net.final_layer.linear.weight.div_(rms)
        net.final_layer.linear.bias.div_(rms)
    start = time.monotonic()
    u_ref, dudt_ref = reference_derivative(net, z, t, r, y, e - x)
    child.record["details"] = {
        "model": config.to_dict(), "batch": batch, "steps": list(DERIVATIVE_STEPS),
        "method": "relative L2 error of du/dt (tangent (v, 0, 1), v = e - x) from FiniteDifference(h) (the library "
                  "default: float32 stencil, TF32 off, whatever the caller's setting), FusedFiniteDifference(h) (the "
                  "released MF-RAE layout, caller's precision) and JVP(), against JVP() on a float64 copy; "
                  "tf32_emulated: operands of matmuls / convolutions / attention rounded to TF32 by "
                  "mfrae.flow.derivative_accuracy.TF32Emulation (compare with the real tf32 rows)",
        "u_rms": float(u_ref.double().square().mean().sqrt()),
        "dudt_rms": float(dudt_ref.double().square().mean().sqrt()),
        "reference_seconds": time.monotonic() - start, "configs": []}
    child.save()
    for precision, (_, methods) in DERIVATIVE_PRECISIONS.items():
        row = {"precision": precision}
        start = time.monotonic()
        try:
            report = derivative_accuracy(net, z, t, r, y, e - x, steps=DERIVATIVE_STEPS, precision=precision,
                                         methods=methods, reference=(u_ref, dudt_ref))
            row["errors"] = report.errors
            for method in methods:
                for h in (None,) if method == "jvp" else DERIVATIVE_STEPS:
                    child.record["values"][_derivative_key(method, h, precision)] = \
                        report.errors[strategy_label(method, h)]
        except Exception as err:  # noqa: BLE001 - recorded, the other precisions still run
            row["error"] = _error_text(err)
        row["seconds"] = time.monotonic() - start
        child.record["details"]["configs"].append(row)
        child.save()


def run_child(args: argparse.Namespace) -> int:
    """Child process: run one section, save its record; errors go into the record, not the exit code."""
    _import_mfrae()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    child = Child(args)
    child.save()
    name = args.child
    try:
        if name == "matmul_peak":
            section_matmul_peak(child)
        elif name in ("train_step", "train_step_compiled"):
            section_train_step(child, compiled=name == "train_step_compiled")
        elif name == "derivative_accuracy":
            section_derivative_accuracy(child)
        else:
            section_sampling(child, 512 if name == "sampling_512" else 256, compiled="compiled" in name)
        rows = child.record["details"].get("configs") or list(child.record["details"].get("variants", {}).values())
        failed = [r for r in rows if "error" in r]
        child.record["status"] = "error" if failed else "ok"
        if failed:  # the other configurations' values are kept
            child.record["error"] = f"{len(failed)} of {len(rows)} measurements failed; first: {failed[0]['error']}"
    except Exception as err:  # noqa: BLE001 - the section's error is part of the report
        child.record.update(status="error", error=_error_text(err))
        print(child.record["error"], file=sys.stderr)
    child.save()
    return 0


#################################################################################
#                               Parent: the run                                 #
#################################################################################


class Log:
    """Prints and appends to the log file."""

    def __init__(self, path: Path):
        self.file = path.open("a", buffering=1)
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self.lock:
            print(line, flush=True)
            self.file.write(line + "\n")


def _version(module: str) -> str | None:
    try:
        return importlib.metadata.version(DISTRIBUTIONS[module])
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    """Python, torch, the device and which modules are importable; imports mfrae's modules the check needs."""
    modules = {m: {"present": importlib.util.find_spec(m) is not None, "version": _version(m)}
               for m in DISTRIBUTIONS}
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "modules": modules,
           "missing_required": [m for m in REQUIRED_MODULES if not modules[m]["present"]], "mfrae_import_errors": {}}
    if modules["torch"]["present"]:
        import torch

        cuda = torch.cuda.is_available()
        env.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=cuda,
                   cudnn=torch.backends.cudnn.version() if cuda else None,
                   matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                   cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)
        if cuda:
            props = torch.cuda.get_device_properties(0)
            env.update(device_name=props.name, device_count=torch.cuda.device_count(),
                       capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                       memory_gib=props.total_memory / 2**30)
    else:
        env["cuda_available"] = False
    if not env["missing_required"]:
        _import_mfrae()
        for name in MFRAE_MODULES:
            try:
                importlib.import_module(name)
            except ImportError as err:
                env["mfrae_import_errors"][name] = f"{type(err).__name__}: {err}"
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def _section(status: str = "skipped", reason: str | None = None, name: str = "") -> dict:
    return {"status": status, "reason": reason, "error": None, "seconds": None, "timeout_s": None,
            "values": {k: None for k in VALUES[name]}, "details": None}


def cuda_tests_section(junit: str | None, tests_rc: str | None) -> dict:
    """Counts and per-test outcomes from pytest's JUnit XML (written by gpu_check.sh)."""
    record = _section(name="cuda_tests")
    if tests_rc == "missing":
        record["reason"] = "pytest is not installed: the CUDA tests were not run"
        return record
    if not junit:
        record["reason"] = "not run (no --junit file; gpu_check.sh runs them)"
        return record
    path = Path(junit)
    rc = int(tests_rc) if tests_rc not in (None, "") and tests_rc.lstrip("-").isdigit() else None
    if not path.is_file():
        record.update(status="error", error=f"{path}: no JUnit file (pytest exit code {rc}; 124 = timed out)")
        record["values"]["pytest_rc"] = rc
        return record
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        record.update(status="error", error=f"{path}: unreadable JUnit XML: {err}")
        return record
    tests = []
    for case in root.iter("testcase"):
        outcome, message = "passed", None
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                message = (node.get("message") or node.text or "")[:800]
                break
        tests.append({"name": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0.0), "message": message})
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    record["values"].update(total=len(tests), passed=counts["passed"], failed=counts["failed"], errors=counts["error"],
                            skipped=counts["skipped"], pytest_rc=rc)
    record.update(status="ok" if counts["failed"] == counts["error"] == 0 and rc in (0, None) else "error",
                  details={"tests": tests, "junit": path.name})
    if record["status"] == "error":
        record["error"] = f"{counts['failed']} failed, {counts['error']} errors (pytest exit code {rc})"
    if record["status"] == "ok" and tests and counts["skipped"] == len(tests):
        record.update(status="skipped", reason="every CUDA test was skipped (no CUDA)")
    return record


def _run_section(name: str, base_argv: list[str], timeout: float, workdir: Path, log: Log) -> dict:
    """Runs one section in a child process with a hard `timeout`; returns its record (partial on a kill)."""
    out = workdir / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), *base_argv, "--child", name, "--child-out", str(out),
           "--child-seconds", f"{timeout:.1f}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    tail: deque[str] = deque(maxlen=25)

    def pump():
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log(f"  [{name}] {line}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    killed = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        killed = True
    reader.join(timeout=10)
    record = _section(status="error", name=name)
    if out.is_file():
        saved = json.loads(out.read_text())
        record["values"].update({k: v for k, v in saved["values"].items() if k in record["values"]})
        record.update(details=saved.get("details"), error=saved.get("error"),
                      status="ok" if saved["status"] == "ok" else "error")
    record.update(seconds=time.monotonic() - start, timeout_s=timeout)
    if killed:
        record.update(status="timeout", error=f"killed at its time limit ({timeout:.0f} s); values measured before "
                                               "that are kept")
    elif proc.returncode != 0:
        record.update(status="error", error=f"child exited with code {proc.returncode}:\n" + "\n".join(tail))
    elif record["status"] == "error" and record["error"] is None:
        record["error"] = "child ended without finishing:\n" + "\n".join(tail)
    return record


def _summary(report: dict) -> dict:
    sections = report["sections"]
    peak = sections["matmul_peak"]["values"]["bf16_tflops"]
    for name in ("train_step", "train_step_compiled"):  # MFU needs the matmul peak of the other section
        details = sections[name]["details"] or {}
        for row in details.get("configs", []):
            if "achieved_tflops" in row:
                row["mfu"] = row["achieved_tflops"] / peak if peak else None
        rows = [r for r in details.get("configs", []) if r.get("mfu") is not None]
        default = [r["mfu"] for r in rows if r["matmul_precision"] != "tf32"]
        tf32 = [r["mfu"] for r in rows if r["matmul_precision"] == "tf32"]
        values = sections[name]["values"]
        values["mfu"] = max(default) if default else None
        values["mfu_tf32"] = max(tf32) if tf32 else None
    mfu_all = [v for v in (sections["train_step"]["values"]["mfu"], sections["train_step_compiled"]["values"]["mfu"])
               if v is not None]
    mf1 = {}
    for name in ("sampling_256", "sampling_256_compiled_bf16", "sampling_256_compiled_fp32"):
        for key in ("mf1_bf16_images_per_s", "mf1_fp32_images_per_s"):
            value = sections[name]["values"].get(key)
            if value is not None:
                mf1[f"{name}/{key}"] = value
    best_mf1 = max(mf1.items(), key=lambda kv: kv[1]) if mf1 else (None, None)
    tests = sections["cuda_tests"]["values"]
    return {
        "matmul_peak_bf16_tflops": peak,
        "train_mfu": max(mfu_all) if mfu_all else None,
        "train_mfu_target": TARGETS["train_mfu"],
        "train_mfu_target_met": max(mfu_all) >= TARGETS["train_mfu"] if mfu_all else None,
        "mf1_256_images_per_s": best_mf1[1],
        "mf1_256_best_of": best_mf1[0],
        "mf1_256_target": TARGETS["mf1_256_images_per_s"],
        "mf1_256_target_met": best_mf1[1] >= TARGETS["mf1_256_images_per_s"] if best_mf1[1] is not None else None,
        "mf1_512_bf16_images_per_s": sections["sampling_512"]["values"]["mf1_bf16_images_per_s"],
        "cuda_tests": None if tests["total"] is None else
        f"{tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, {tests['skipped']} skipped",
        "statuses": {name: s["status"] for name, s in sections.items()},
    }


def _skip_reason(args: argparse.Namespace, env: dict) -> str | None:
    """Why no section is measured, or None."""
    no_cuda = args.device.startswith("cuda") and not env.get("cuda_available")
    if args.dry_run:
        return "dry run; no CUDA" if no_cuda else "dry run"
    if no_cuda:
        return "no CUDA device"
    return None


def _child_argv(args: argparse.Namespace) -> list[str]:
    """The options a child needs, rebuilt from the parsed arguments."""
    argv = ["--device", args.device, "--compile-backend", args.compile_backend, "--train-warmup",
            str(args.train_warmup), "--train-steps", str(args.train_steps),
            "--sample-repeats", str(args.sample_repeats)]
    if args.tiny:
        argv.append("--tiny")
    if args.threads:
        argv += ["--threads", str(args.threads)]
    for flag, value in (("--train-batches", args.train_batches), ("--compiled-train-batch", args.compiled_train_batch),
                        ("--sample-batch", args.sample_batch), ("--sample-512-batch", args.sample_512_batch)):
        if value:
            argv += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return argv


def run(args: argparse.Namespace) -> int:
    start = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_check.log")
    log(f"== mfrae GPU check {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)}")
    env = environment()
    report = {"schema": SCHEMA, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:],
              "mode": "dry-run" if args.dry_run else ("tiny" if args.tiny else "full"), "device": args.device,
              "budget_s": args.budget_s, "elapsed_s": None, "environment": env, "targets": TARGETS,
              "sections": {name: _section(name=name) for name in VALUES}, "summary": None,
              "files": {"log": "gpu_check.log", "cuda_tests_log": "cuda_tests.log" if args.junit else None,
                        "cuda_tests_junit": Path(args.junit).name if args.junit else None}}
    path = out / "gpu_check.json"
    report["sections"]["cuda_tests"] = cuda_tests_section(args.junit, args.tests_rc)
    for module in env["missing_required"]:
        log(f"gpu_check: missing Python module {module!r}: mfrae's models / flow / generation need it "
            "(install it, or carry it as a wheel)")
    for module, error in env["mfrae_import_errors"].items():
        log(f"gpu_check: cannot import {module}: {error}")
    blocked = [f"missing Python module {m!r}" for m in env["missing_required"]]
    blocked += [f"cannot import {m}: {e}" for m, e in env["mfrae_import_errors"].items()]
    reason = _skip_reason(args, env)
    log(f"device: {env.get('device_name', 'no CUDA device')}; torch {env.get('torch')}; budget {args.budget_s:.0f} s")
    selected = [s for s in MEASURED if s in args.sections]
    cumulative = 0.0
    with tempfile.TemporaryDirectory(prefix="mfrae_gpu_check_") as workdir:
        for name in MEASURED:
            cumulative += SHARES[name]
            record = report["sections"][name]
            if name not in selected:
                record["reason"] = "not selected (--sections)"
            elif blocked:
                record.update(status="error", error="; ".join(blocked))
            elif reason:
                record["reason"] = reason
            else:
                now, floor = time.monotonic(), 0.0 if args.tiny else MIN_SECTION_S
                share_left = start + args.budget_s * cumulative / sum(SHARES.values()) - now
                timeout = min(max(share_left, floor), start + args.budget_s - now)  # never past the whole budget
                if timeout <= 0 or timeout < floor:
                    record["reason"] = f"budget exhausted ({timeout:.0f} s left of its share)"
                else:
                    log(f"== {name} (up to {timeout:.0f} s)")
                    record = _run_section(name, _child_argv(args), timeout, Path(workdir), log)
                    report["sections"][name] = record
                    log(f"   {name}: {record['status']} in {record['seconds']:.1f} s; "
                        + ", ".join(f"{k}={v:.4g}" for k, v in record["values"].items() if isinstance(v, float)))
                    if record["error"]:
                        log(f"   error: {record['error'].splitlines()[0]}")
            report["summary"] = _summary(report)
            report["elapsed_s"] = time.monotonic() - start
            _atomic_write_json(path, report)  # after every section: a killed run keeps what it measured
    log(f"== summary: {json.dumps(report['summary'])}")
    log(f"wrote {path}")
    statuses = [s["status"] for s in report["sections"].values()]
    if blocked or "error" in statuses or "timeout" in statuses:
        return 1
    if not args.dry_run and reason:
        log(f"gpu_check: {reason}: nothing measured (--dry-run writes the schema only; --tiny --device cpu runs "
            "the code paths on a CPU)")
        return 1
    return 0


#################################################################################
#                                   CLI                                         #
#################################################################################


def _positive_int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    value = _positive_int_list(text)
    if len(value) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return value[0]


def _sections(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = sorted(set(names) - set(MEASURED))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {unknown}; choose from {', '.join(MEASURED)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="output folder: gpu_check.json and gpu_check.log (required)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="wall-clock budget of all sections together, seconds (default 420)")
    parser.add_argument("--sections", type=_sections, default=MEASURED,
                        help="comma-separated subset of " + ",".join(MEASURED))
    parser.add_argument("--dry-run", action="store_true", help="measure nothing: write the report with every section "
                                                               "skipped (its schema)")
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu with --tiny")
    parser.add_argument("--tiny", action="store_true", help="tiny models and batches (CPU smoke runs of every path)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch intra-op threads in the children")
    parser.add_argument("--train-batches", type=_positive_int_list, default=None,
                        help="training batch sizes (default 32,64,128; tiny 4)")
    parser.add_argument("--compiled-train-batch", type=_positive_int, default=None, help="default 64 (tiny 4)")
    parser.add_argument("--train-warmup", type=_positive_int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--train-steps", type=_positive_int, default=5, help="timed steps, median (default 5)")
    parser.add_argument("--sample-batch", type=_positive_int, default=None, help="256 px batch (default 256, tiny 4)")
    parser.add_argument("--sample-512-batch", type=_positive_int, default=None, help="512 px batch (default 64)")
    parser.add_argument("--sample-repeats", type=_positive_int, default=3,
                        help="timed batches per sampling variant after one warm-up batch (default 3)")
    parser.add_argument("--junit", default=None, help="JUnit XML of the CUDA tests (gpu_check.sh)")
    parser.add_argument("--tests-rc", default=None, help="pytest's exit code, or 'missing' (gpu_check.sh)")
    parser.add_argument("--child", choices=MEASURED, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-seconds", type=float, default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.child:
        if not args.child_out or args.child_seconds is None:
            parser.error("--child needs --child-out and --child-seconds")
        return args
    if not args.out:
        parser.error("--out DIR is required")
    if not (math.isfinite(args.budget_s) and args.budget_s >= 0):
        parser.error(f"--budget-s must be a number of seconds >= 0, got {args.budget_s}")
    if args.device == "cpu" and not (args.tiny or args.dry_run):
        parser.error("--device cpu needs --tiny (the XL shapes take minutes per step on a CPU)")
    if not (args.device == "cpu" or args.device == "cuda" or args.device.startswith("cuda:")):
        parser.error(f"--device must be cuda, cuda:N or cpu, got {args.device!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
