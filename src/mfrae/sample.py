"""`mfrae sample`: images from a teacher (ODE) or MeanFlow (jumps) checkpoint, decoded by the RAE decoder.

    MeanFlow:  z <- z - (t_i - t_{i+1}) u(z, t_{i+1}, t_i) on the uniform grid of `--steps` jumps (1 or 2 usually)
    teacher:   Euler / Heun on the shifted grid, `--steps` network evaluations (the released configs' "50 steps"
               are 50 grid points = `--steps 49`), optional CFG or AutoGuidance
    images  =  clamp(RAE.decode(z), 0, 1)

Writes DIR/images/NNNNNN.png, DIR/grid.png, DIR/samples.npz (the ADM evaluator's layout: uint8 NHWC `arr_0`,
labels `arr_1`) and DIR/sampling.json (settings and images per second, decoding included).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mfrae.checkpoint import load_dit_dh, load_latent_stats, load_vit_decoder
from mfrae.config import from_dict
from mfrae.eval.samples import save_adm_npz, save_image_dir, to_uint8_nhwc
from mfrae.flow.paths import dimension_shift
from mfrae.flow.samplers import flow_matching_sample, meanflow_sample
from mfrae.images import save_image_grid
from mfrae.models.dit_dh import DiTDH
from mfrae.models.rae import RAE
from mfrae.pipeline import RAEConfig, build_rae_encoder
from mfrae.train.runs import resolve_weights


@dataclass
class SampleSettings:
    steps: int = 1
    batch_size: int = 64
    shift: float | None = None  # teacher ODE grid shift; None: sqrt(C H W / 4096)
    method: str = "euler"
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    autoguidance_scale: float = 1.0
    decoder_bf16: bool = False


def class_labels(spec: str, num: int, num_classes: int, seed: int) -> Tensor:
    """"equal" (num / num_classes per class, shuffled), "random", or a comma list cycled to `num`."""
    generator = torch.Generator().manual_seed(seed)
    if spec == "equal":
        labels = torch.arange(num) % num_classes
        return labels[torch.randperm(num, generator=generator)]
    if spec == "random":
        return torch.randint(0, num_classes, (num,), generator=generator)
    try:
        values = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--labels must be 'equal', 'random' or a comma list of class ids, got {spec!r}") from None
    bad = [v for v in values if not 0 <= v <= num_classes]
    if not values or bad:
        raise ValueError(f"--labels: class ids must be in [0, {num_classes}] ({num_classes} = null), got {spec!r}")
    return torch.tensor(values).repeat(math.ceil(num / len(values)))[:num]


@torch.inference_mode()
def generate(model: DiTDH, rae: RAE, labels: Tensor, settings: SampleSettings, seed: int = 0,
             weak_model: DiTDH | None = None, device: torch.device | str = "cpu") -> Tensor:
    """Images [N, 3, H, W] in [0, 1] for `labels`; the noise of sample i depends only on (seed, i)."""
    shape = model.latent_shape
    shift = settings.shift if settings.shift is not None else dimension_shift(shape)
    out = []
    for start in range(0, len(labels), settings.batch_size):
        y = labels[start : start + settings.batch_size].to(device)
        noise = torch.stack([
            torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + start + i)) for i in range(len(y))
        ]).to(device)
        if model.is_meanflow:
            z = meanflow_sample(model, noise, y, steps=settings.steps)
        else:
            z = flow_matching_sample(model, noise, y, num_points=settings.steps + 1, shift=shift,
                                     method=settings.method, cfg_scale=settings.cfg_scale,
                                     cfg_interval=settings.cfg_interval, weak_model=weak_model,
                                     autoguidance_scale=settings.autoguidance_scale)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=settings.decoder_bf16):
            out.append(rae.decode(z).float().clamp(0, 1).cpu())
    return torch.cat(out)


def _run_config(ckpt: str) -> dict:
    """The resolved config of the run that produced `ckpt`, when it is a run directory ({} otherwise)."""
    config = Path(ckpt) / "config.yaml"
    if not config.is_file():
        return {}
    import yaml

    return yaml.safe_load(config.read_text()) or {}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="run directory, checkpoint folder or weights file (teacher or MeanFlow)")
    parser.add_argument("--steps", type=int, default=1, help="MeanFlow jumps, or teacher network evaluations")
    parser.add_argument("--num", type=int, default=64, help="number of images")
    parser.add_argument("--labels", default="equal", help="'equal' (default), 'random' or a comma list of class ids")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--decoder", help="RAE decoder (default: the run's rae.decoder)")
    parser.add_argument("--stats", help="latent statistics (default: the run's rae.stats)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shift", type=float, default=None,
                        help="teacher ODE time shift (default: the run's training shift, else sqrt(CHW/4096))")
    parser.add_argument("--method", choices=("euler", "heun"), default="euler", help="teacher ODE solver")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="teacher classifier-free guidance scale")
    parser.add_argument("--cfg-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("T_MIN", "T_MAX"))
    parser.add_argument("--weak-ckpt", help="AutoGuidance: the weaker teacher")
    parser.add_argument("--ag-scale", type=float, default=1.0, help="AutoGuidance scale")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--decoder-bf16", action="store_true", help="run the decoder under bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone and the decoder")
    parser.add_argument("--no-png", action="store_true", help="skip the individual PNG files")


def run(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.num < 1:
        raise ValueError(f"--steps and --num must be >= 1, got {args.steps} and {args.num}")
    run_config = _run_config(args.ckpt)
    run_rae = from_dict(RAEConfig, run_config.get("rae") or {}, "rae")  # the run's part of its PipelineConfig
    # A teacher samples on the time grid it was trained with, unless told otherwise.
    trained_shift = (run_config.get("objective") or {}).get("shift")
    decoder_spec, stats_spec = args.decoder or run_rae.decoder, args.stats or run_rae.stats
    if not decoder_spec:
        raise ValueError("no RAE decoder: pass --decoder (or sample from a run directory whose config names rae.decoder)")
    device = torch.device(args.device)
    model = load_dit_dh(resolve_weights(args.ckpt)).to(device).eval()
    weak = load_dit_dh(resolve_weights(args.weak_ckpt), meanflow=False).to(device).eval() if args.weak_ckpt else None
    decoder = load_vit_decoder(resolve_weights(decoder_spec))
    stats = load_latent_stats(resolve_weights(stats_spec)) if stats_spec else None
    rae = _decode_only_rae(run_rae, decoder, stats).to(device).eval()
    if args.compile:
        model, rae.decoder = torch.compile(model), torch.compile(rae.decoder)
    labels = class_labels(args.labels, args.num, model.num_classes, args.seed)
    shift = args.shift if args.shift is not None else trained_shift
    settings = SampleSettings(steps=args.steps, batch_size=args.batch_size, shift=shift, method=args.method,
                              cfg_scale=args.cfg_scale, cfg_interval=tuple(args.cfg_interval),
                              autoguidance_scale=args.ag_scale, decoder_bf16=args.decoder_bf16)
    start = time.perf_counter()
    images = generate(model, rae, labels, settings, args.seed, weak, device)
    seconds = time.perf_counter() - start

    out = Path(args.out)
    uint8 = to_uint8_nhwc(images)
    save_adm_npz(out / "samples.npz", uint8, labels.numpy().astype(np.int64))
    save_image_grid(images[:64], out / "grid.png")
    if not args.no_png:
        save_image_dir(out / "images", uint8, labels.numpy())
    report = {
        "ckpt": str(args.ckpt), "kind": "meanflow" if model.is_meanflow else "teacher", "steps": args.steps,
        "nfe": args.steps * (2 if (not model.is_meanflow and args.method == "heun") else 1), "num": args.num,
        "seconds": seconds, "images_per_second": args.num / seconds, "seed": args.seed,
    }
    (out / "sampling.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.num} images to {out} ({report['images_per_second']:.1f} images/s, decoding included)")
    return 0


def _decode_only_rae(run_rae: RAEConfig, decoder, stats) -> RAE:
    """Decoding needs the encoder's pixel normalisation only; read it without loading encoder weights."""
    if run_rae.encoder.name == "dinov2":
        return RAE(None, decoder, stats)  # ImageNet mean / std, as DINOv2's processor
    return RAE(build_rae_encoder(run_rae), decoder, stats)
