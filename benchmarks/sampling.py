"""End-to-end sampling throughput: noise -> latent -> pixels, MeanFlow 1-step and 2-step vs the teacher ODE.

Run from a fresh clone (after `make install`):

    .venv/bin/python benchmarks/sampling.py                  # CPU: digits-small, batch 64, 2 threads, table
    .venv/bin/python benchmarks/sampling.py --json           # one JSON object
    .venv/bin/python benchmarks/sampling.py --preset imagenet256-xl --batch 32 --decoder-bf16   # GPU
    .venv/bin/python benchmarks/sampling.py --compile        # torch.compile the DiT^DH models and the decoder
    .venv/bin/python benchmarks/sampling.py --preset tiny --batch 2 --repeats 1 --warmup 0   # smoke run

(The script puts ../src on sys.path.) Without `--preset` the run uses `digits-small` on CPU and `imagenet256-xl`
on CUDA. Weights are random (sampling cost does not depend on their values; adaLN / output layers get small
random weights instead of the zero init so no kernel sees all-zero data).

Variants, all through `mfrae.sample.generate` (the `mfrae sample` code path: batched, `torch.inference_mode`,
per-sample seeded noise, RAE decode, clamp, copy to host):

    mf1        MeanFlow student, 1 jump  (1 NFE):  x = e - u(e, r=0, t=1)
    mf2        MeanFlow student, 2 jumps (2 NFE) on the uniform grid [1, 0.5, 0]
    teacher50  flow-matching teacher, Euler on the released 50-point shifted grid = 49 NFE (`mfrae sample
               --steps 49`, `mfrae.flow.samplers.flow_matching_sample`; the released RAE sampler), no guidance

Each variant decodes its latents with the same ViT decoder. Timing: one process, the variants interleaved
batch by batch (rotating the order) after `--warmup` rounds; the median of `--repeats` batches per variant.
The time of every DiT^DH call and of `RAE.decode` is recorded as well (CUDA events on GPU, so nothing is
synchronised inside a batch), giving the decoder's share of the end-to-end time; "other" is noise generation,
sampler arithmetic, clamping and the copy to the host. The speedup column is images/s relative to teacher50;
"MAC model" is what the per-image multiply-add counts alone would predict ((49 B + D) / (k B + D)).
Children-free: run with OMP_WAIT_POLICY=PASSIVE on a shared CPU (set here when unset, before torch loads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch / OpenMP is loaded

VARIANTS = ("mf1", "mf2", "teacher50")
NFE = {"mf1": 1, "mf2": 2, "teacher50": 49}

# name: (DiT^DH kwargs, ViT decoder kwargs, default batch, teacher ODE shift (None: sqrt(CHW / 4096)))
PRESETS: dict[str, tuple[dict, dict, int, float | None]] = {
    # A few-thousand-parameter pipeline for smoke runs (tests/test_benchmarks.py): seconds, not a measurement.
    "tiny": (
        {"input_size": 4, "in_channels": 8, "hidden_size": (32, 48), "depth": (2, 1), "num_heads": (2, 2),
         "num_classes": 10},
        {"encoder_hidden_size": 8, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64,
         "patch_size": 4, "num_patches": 16},
        4, 1.0),
    # The `digits` config: a 64-d small-ViT encoder on 32 px images (4 x 4 tokens of patch 8).
    "digits-small": (
        {"input_size": 4, "in_channels": 64, "hidden_size": (128, 192), "depth": (4, 1), "num_heads": (4, 4),
         "num_classes": 10},
        {"encoder_hidden_size": 64, "hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 512,
         "patch_size": 8, "num_patches": 16},
        64, 1.0),
    # Released ImageNet pipelines: DiT^DH-XL on DINOv2-B latents, ViT-XL decoder.
    "imagenet256-xl": (
        {"input_size": 16, "in_channels": 768, "hidden_size": (1152, 2048), "depth": (28, 2), "num_heads": (16, 16),
         "num_classes": 1000},
        {"encoder_hidden_size": 768, "hidden_size": 1152, "num_layers": 28, "num_heads": 16, "intermediate_size": 4096,
         "patch_size": 16, "num_patches": 256},
        32, None),
    "imagenet512-xl": (
        {"input_size": 32, "in_channels": 768, "hidden_size": (1152, 2048), "depth": (28, 2), "num_heads": (16, 16),
         "num_classes": 1000},
        {"encoder_hidden_size": 768, "hidden_size": 1152, "num_layers": 28, "num_heads": 16, "intermediate_size": 4096,
         "patch_size": 16, "num_patches": 1024},
        8, None),
}
CPU_PRESETS = ("tiny", "digits-small")
TARGETS = {"mf1_vs_teacher50": 20.0}  # CPU, digits-small, 2 threads


def _import_mfrae():
    try:
        import mfrae  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


class _Timer:
    """Accumulates the time of wrapped calls: perf_counter on CPU, CUDA events on GPU (no sync inside a batch)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.reset()

    def reset(self) -> None:
        self.seconds = 0.0
        self.events: list = []

    def wrap(self, fn):
        import torch

        def timed(*args, **kwargs):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*args, **kwargs)
                end.record()
                self.events.append((start, end))
                return out
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds += time.perf_counter() - t0
            return out

        return timed

    def total(self) -> float:
        """Seconds so far (call after the work is finished: generate() ends with a copy to the host)."""
        return self.seconds + sum(s.elapsed_time(e) for s, e in self.events) / 1e3


class _TimedModel:
    """A DiT^DH stand-in for `generate`: calls go through a timer, attributes to the model."""

    def __init__(self, model, compiled, timer: _Timer):
        self._model, self._call = model, timer.wrap(compiled)

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def _macs(dit_kwargs: dict, dec_kwargs: dict) -> tuple[float, float, float]:
    """Per-image GMACs (papers' convention) of the student, teacher and decoder, on the meta device."""
    import torch

    from mfrae.flops import count_linear_macs
    from mfrae.models.dit_dh import DiTDH, DiTDHConfig
    from mfrae.models.vit_decoder import ViTDecoder, ViTDecoderConfig

    with torch.device("meta"):
        student = DiTDH(DiTDHConfig(interval_embedding=True, **dit_kwargs))
        teacher = DiTDH(DiTDHConfig(interval_embedding=False, **dit_kwargs))
        decoder = ViTDecoder(ViTDecoderConfig(**dec_kwargs))
        x, t, y = torch.zeros(1, *student.latent_shape), torch.ones(1), torch.zeros(1, dtype=torch.long)
        tokens = torch.zeros(1, decoder.config.num_patches, decoder.config.encoder_hidden_size)
        return (count_linear_macs(student, x, t, y, torch.zeros(1)) / 1e9, count_linear_macs(teacher, x, t, y) / 1e9,
                count_linear_macs(decoder, tokens) / 1e9)


def run(args: argparse.Namespace) -> dict:
    _import_mfrae()
    import torch

    from mfrae.models.dit_dh import DiTDH, DiTDHConfig
    from mfrae.models.rae import RAE
    from mfrae.models.vit_decoder import ViTDecoder, ViTDecoderConfig
    from mfrae.sample import SampleSettings, generate

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dit_kwargs, dec_kwargs, default_batch, shift = PRESETS[args.preset]
    batch = args.batch or default_batch
    torch.manual_seed(0)
    with torch.device(device):
        student = DiTDH(DiTDHConfig(interval_embedding=True, **dit_kwargs)).eval()
        teacher = DiTDH(DiTDHConfig(interval_embedding=False, **dit_kwargs)).eval()
        decoder = ViTDecoder(ViTDecoderConfig(**dec_kwargs)).eval()
        for net in (student, teacher):
            for m in [b.adaLN_modulation[-1] for b in net.blocks] + [net.final_layer.adaLN_modulation[-1],
                                                                    net.final_layer.linear]:
                torch.nn.init.normal_(m.weight, std=0.02)
    rae = RAE(None, decoder, None).eval()  # decode-only, as `mfrae sample`; no latent stats (identity)

    compile_fn = (lambda m: torch.compile(m, mode=args.compile_mode)) if args.compile else (lambda m: m)
    rae.decoder = compile_fn(decoder)
    net_timer, dec_timer = _Timer(cuda), _Timer(cuda)
    rae.decode = dec_timer.wrap(rae.decode)  # instance attribute: `generate` calls rae.decode(z)
    models = {"student": _TimedModel(student, compile_fn(student), net_timer),
              "teacher": _TimedModel(teacher, compile_fn(teacher), net_timer)}
    runs = {
        "mf1": (models["student"], SampleSettings(steps=1, batch_size=batch, decoder_bf16=args.decoder_bf16)),
        "mf2": (models["student"], SampleSettings(steps=2, batch_size=batch, decoder_bf16=args.decoder_bf16)),
        "teacher50": (models["teacher"], SampleSettings(steps=49, batch_size=batch, shift=shift,
                                                        decoder_bf16=args.decoder_bf16)),
    }
    variants = [v for v in VARIANTS if v in args.variants]
    labels = torch.randint(0, student.num_classes, (batch,), generator=torch.Generator().manual_seed(0))

    def one_batch(variant: str, seed: int) -> dict:
        model, settings = runs[variant]
        net_timer.reset()
        dec_timer.reset()
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        images = generate(model, rae, labels, settings, seed=seed, device=device)  # ends with a host copy
        total = time.perf_counter() - t0
        assert images.shape[0] == batch and bool(torch.isfinite(images).all())
        return {"total": total, "network": net_timer.total(), "decoder": dec_timer.total()}

    warm_start = time.perf_counter()
    for i in range(args.warmup):
        for v in variants:
            one_batch(v, i)
    warmup_seconds = time.perf_counter() - warm_start
    samples: dict[str, list[dict]] = {v: [] for v in variants}
    for k in range(args.repeats):
        order = variants[k % len(variants):] + variants[: k % len(variants)]
        for v in order:
            samples[v].append(one_batch(v, 1000 + k))

    student_gmacs, teacher_gmacs, decoder_gmacs = _macs(dit_kwargs, dec_kwargs)
    results = {}
    for v, rows in samples.items():
        total = statistics.median(r["total"] for r in rows)
        decoder_s = statistics.median(r["decoder"] for r in rows)
        network_s = statistics.median(r["network"] for r in rows)
        backbone = student_gmacs if v.startswith("mf") else teacher_gmacs
        results[v] = {
            "nfe": NFE[v], "seconds_per_batch": total, "images_per_s": batch / total,
            "decoder_seconds": decoder_s, "network_seconds": network_s,
            "decoder_share": decoder_s / total, "network_share": network_s / total,
            "other_share": max(0.0, 1.0 - (decoder_s + network_s) / total),
            "gmacs_per_image": NFE[v] * backbone + decoder_gmacs,
            "seconds_all": [round(r["total"], 4) for r in rows],
        }
    if "teacher50" in results:
        ref = results["teacher50"]
        for r in results.values():
            r["speedup_vs_teacher50"] = r["images_per_s"] / ref["images_per_s"]
            r["mac_model_speedup"] = ref["gmacs_per_image"] / r["gmacs_per_image"]
    return {
        "preset": args.preset, "batch": batch, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu", "threads": args.threads,
        "compile": args.compile, "compile_mode": args.compile_mode if args.compile else None,
        "decoder_bf16": args.decoder_bf16, "repeats": args.repeats, "warmup": args.warmup,
        "warmup_seconds": warmup_seconds, "teacher_shift": shift if shift is not None else "sqrt(CHW/4096)",
        "gmacs": {"student": student_gmacs, "teacher": teacher_gmacs, "decoder": decoder_gmacs},
        "params": {"student": sum(p.numel() for p in student.parameters()),
                   "teacher": sum(p.numel() for p in teacher.parameters()),
                   "decoder": sum(p.numel() for p in decoder.parameters())},
        "variants": results,
    }


def _resolve_defaults(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.preset is None:
        args.preset = "digits-small" if args.device == "cpu" else "imagenet256-xl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="pipeline (default: digits-small on CPU, imagenet256-xl on CUDA)")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default: the preset's)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (compilation happens here)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both DiT^DH models and the decoder")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune")
    parser.add_argument("--decoder-bf16", action="store_true", help="run the decoder under bf16 autocast")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset of " + ",".join(VARIANTS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1 or args.warmup < 0 or (args.batch is not None and args.batch < 1):
        parser.error("--repeats, --threads and --batch must be >= 1, --warmup >= 0")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not args.variants or set(args.variants) - set(VARIANTS):
        parser.error(f"--variants must be a subset of {VARIANTS}")
    _resolve_defaults(args, parser)
    if args.device == "cpu" and args.preset not in CPU_PRESETS:
        print(f"warning: preset {args.preset} on a CPU allocates several GB and takes minutes per batch",
              file=sys.stderr)
    load_before = os.getloadavg()[0]
    report = run(args)
    report.update(load_average_before=load_before, load_average_after=os.getloadavg()[0], cpu_count=os.cpu_count(),
                  omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"), targets=TARGETS,
                  date=time.strftime("%Y-%m-%d %H:%M:%S"))
    if args.json:
        print(json.dumps(report))
        return 0
    where = f"{args.threads} threads" if report["device"] == "cpu" else report["device_name"]
    g = report["gmacs"]
    print(f"sampling preset {report['preset']}: batch {report['batch']}, {report['device']} ({where}), "
          f"compile={'yes' if args.compile else 'no'}, decoder bf16={'yes' if args.decoder_bf16 else 'no'}, "
          f"median of {args.repeats} batches (load average before / after: {report['load_average_before']:.2f} / "
          f"{report['load_average_after']:.2f})")
    print(f"per image: student {g['student']:.3f} GMACs, teacher {g['teacher']:.3f}, decoder {g['decoder']:.3f}; "
          f"warm-up {report['warmup_seconds']:.1f} s")
    print(f"{'variant':<11}{'NFE':>4}{'s/batch':>10}{'images/s':>10}{'decoder':>9}{'network':>9}{'other':>7}"
          f"{'x teacher50':>13}{'MAC model':>11}")
    for name, r in report["variants"].items():
        speed = f"{r['speedup_vs_teacher50']:.1f}" if "speedup_vs_teacher50" in r else "n/a"
        model = f"{r['mac_model_speedup']:.1f}" if "mac_model_speedup" in r else "n/a"
        print(f"{name:<11}{r['nfe']:>4}{r['seconds_per_batch']:>10.3f}{r['images_per_s']:>10.1f}"
              f"{r['decoder_share']:>9.1%}{r['network_share']:>9.1%}{r['other_share']:>7.1%}{speed:>13}{model:>11}")
    if "mf1" in report["variants"] and "teacher50" in report["variants"]:
        value, target = report["variants"]["mf1"]["speedup_vs_teacher50"], TARGETS["mf1_vs_teacher50"]
        verdict = "met" if value >= target else "NOT met"
        print(f"mf1 images/s vs teacher50: {value:.1f}x (target >= {target:g}x: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
