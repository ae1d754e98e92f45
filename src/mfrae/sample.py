"""`mfrae sample`: images from a teacher (ODE) or MeanFlow (jumps) checkpoint, decoded by the RAE decoder.

    MeanFlow:  `--steps` uniform jumps (1 or 2 usually) or the explicit time grid `--grid 1,0.6,0`
    teacher:   Euler / Heun on the shifted grid, `--steps` network evaluations (the released configs' "50 steps"
               are 50 grid points = `--steps 49`), optional CFG or AutoGuidance
    images  =  clamp(RAE.decode(z), 0, 1), then uint8 by truncation (ADM convention); see `mfrae.generation`

Streaming: samples are generated batch by batch, turned into uint8 and written into shards of `--shard-size`
consecutive indices (`mfrae.sample_shards`); `samples.npz` is then assembled from the shards in pieces. Host
memory depends on the batch size only, not on `--num-samples`.

Determinism: the noise of sample i depends only on (seed, i): it is drawn on the CPU from its own generator
and then moved to the device (`mfrae.generation.sample_noise`); the label of sample i is entry i of
`class_labels(spec, num, num_classes, seed)`, computed whole on every process. The images therefore do not
depend on the number of processes, on which process made which shard, or on resuming; the batch size changes
them only by kernel rounding (batches never cross a shard, so with a shard size that is a multiple of the batch
size every batch is the same whatever the number of processes, and the files are byte-identical).

Several processes: `torchrun --nproc_per_node N -m mfrae sample --num-samples ...` (nccl on GPU, gloo on CPU)
deals the missing shards out to the processes; rank 0 assembles `samples.npz` once every process is done.
(torchrun reads `--num` as an ambiguous abbreviation of its `--numa-binding`: spell `--num-samples` there.)
`--resume` continues an interrupted run, whatever killed it: complete shards are kept as they are, damaged or
half-written ones are redone, and the final files are those of an uninterrupted run.

The output folder: a new run needs a folder without another run's outputs (plan.json, samples.npz, shards,
images/*.png, ...), so that no stale image ends up beside the new ones; `--resume` continues the run whose
plan.json is there (same settings only), `--overwrite` deletes that earlier run's files first (after the
arguments, the weights and the statistics have been checked, so bad input never costs the earlier run).

Checks: numeric options are finite and in range; weights and statistics must be finite; and every batch's
latents and images are checked before anything is written from them, so NaN never becomes black images: a
non-finite batch writes nothing, and a new (single-process) run stopped by one removes what it had written.

Writes DIR/samples.npz (ADM layout: uint8 NHWC `arr_0`, int64 labels `arr_1`), DIR/images/NNNNNN.png and
labels.txt (unless --no-png), DIR/grid.png (the first 64), DIR/shards/, DIR/plan.json and DIR/sampling.json
(settings, seconds, images per second, decoding included).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mfrae.checkpoint import load_dit_dh, load_latent_stats, load_vit_decoder
from mfrae.config import from_dict
from mfrae.distributed import DistInfo, gather_objects, process_group
from mfrae.fileio import atomic_write_text
from mfrae.generation import (NonFiniteSamples, SampleSettings, batches, class_labels, generate, generate_batch,
                              generate_indices, prefetched_noise)
from mfrae.interrupts import StopSignals, exit_status, resume_command, signal_name
from mfrae.images import from_uint8_nhwc, save_image_grid, to_uint8_nhwc
from mfrae.models.dit_dh import DiTDH
from mfrae.models.encoders import PIXEL_NORMALISATION
from mfrae.models.rae import RAE
from mfrae.pipeline import RAEConfig, build_rae_encoder
from mfrae.sample_shards import SHARDS, ShardPlan, save_pngs, write_adm_npz
from mfrae.train.runs import describe, resolve_weights, run_config

__all__ = ["Models", "SampleSettings", "class_labels", "generate", "generate_batch", "generate_indices",
           "load_backbone", "load_models", "add_arguments", "run"]
PLAN_FILE = "plan.json"
MAX_SEED = 2**32 - 1  # seed * 1_000_003 + index must fit a generator's 64-bit seed
# What a run writes into --out: these files, and in these folders the files matching these patterns.
_OUTPUT_FILES = (PLAN_FILE, "samples.npz", "grid.png", "sampling.json")
_OUTPUT_FOLDERS = {SHARDS: ("shard_*.npz", ".*.partial"), "images": ("*.png", "labels.txt", ".*.partial")}


#################################################################################
#                                The command                                    #
#################################################################################


def parse_grid(text: str) -> tuple[float, ...]:
    """"1,0.6,0" -> (1.0, 0.6, 0.0): a strictly decreasing MeanFlow time grid in [0, 1] (ValueError otherwise)."""
    try:
        grid = tuple(float(v) for v in text.split(","))
    except ValueError:
        grid = ()
    ok = len(grid) >= 2 and all(math.isfinite(t) for t in grid)
    if not ok or any(b >= a for a, b in zip(grid, grid[1:])) or not (0 <= grid[-1] and grid[0] <= 1):
        raise ValueError(f"--grid: expected at least 2 strictly decreasing times in [0, 1], got {text!r}")
    return grid


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True,
                        help="run directory, checkpoint folder or weights file (teacher or MeanFlow)")
    parser.add_argument("--steps", type=int, default=None,
                        help="MeanFlow jumps, or teacher network evaluations (default 1)")
    parser.add_argument("--grid", default=None, metavar="T0,T1,...",
                        help="explicit MeanFlow time grid, e.g. 1,0.6,0 (instead of --steps' uniform one)")
    parser.add_argument("--num-samples", "--num", dest="num", type=int, default=64,
                        help="number of images (spell --num-samples under torchrun: it takes --num for its own)")
    parser.add_argument("--labels", default="equal", help="'equal' (default), 'random' or a comma list of class ids")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--decoder", help="RAE decoder (default: the run's rae.decoder)")
    parser.add_argument("--stats", help="latent statistics (default: the run's rae.stats)")
    parser.add_argument("--rae", metavar="FOLDER_OR_HUB_ID",
                        help="a diffusers AutoencoderRAE (folder or Hub id) instead of --decoder / --stats")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch and process")
    parser.add_argument("--shard-size", type=int, default=1000,
                        help="images per shard file (the unit of resuming; fixed for a run)")
    parser.add_argument("--shift", type=float, default=None,
                        help="teacher ODE time shift (default: the run's training shift, else sqrt(CHW/4096))")
    parser.add_argument("--method", choices=("euler", "heun"), default="euler", help="teacher ODE solver")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="teacher classifier-free guidance scale")
    parser.add_argument("--cfg-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("T_MIN", "T_MAX"))
    parser.add_argument("--weak-ckpt", help="AutoGuidance: the weaker teacher")
    parser.add_argument("--ag-scale", type=float, default=1.0, help="AutoGuidance scale")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (under torchrun each process takes cuda:LOCAL_RANK)")
    parser.add_argument("--bf16", action="store_true", help="run the backbone under bf16 autocast")
    parser.add_argument("--decoder-bf16", action="store_true", help="run the decoder under bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone and the decoder")
    parser.add_argument("--no-png", action="store_true", help="skip the individual PNG files")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an earlier run's outputs in --out (samples, shards, images) and start anew")


def _check_arguments(args: argparse.Namespace) -> None:
    """Every option's value, before any file is read or written; one line naming the option."""
    if isinstance(args.grid, str):
        args.grid = parse_grid(args.grid)
    if args.grid is not None and args.steps is not None and args.steps != len(args.grid) - 1:
        raise ValueError(f"--steps {args.steps} contradicts --grid ({len(args.grid) - 1} jumps); give one of them")
    args.steps = len(args.grid) - 1 if args.grid is not None else (1 if args.steps is None else args.steps)
    options = vars(args)
    for name, option in (("steps", "--steps"), ("num", "--num-samples"), ("batch_size", "--batch-size"),
                         ("shard_size", "--shard-size")):
        if options[name] < 1:
            raise ValueError(f"{option} must be >= 1, got {options[name]}")
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed must be in [0, {MAX_SEED}], got {args.seed}")
    for name in ("cfg_scale", "ag_scale"):
        if not math.isfinite(options[name]):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {options[name]}")
    if args.shift is not None and not (math.isfinite(args.shift) and args.shift > 0):
        raise ValueError(f"--shift must be a finite number > 0, got {args.shift}")
    t_min, t_max = args.cfg_interval
    if not 0 <= t_min <= t_max <= 1:  # also refuses NaN, which fails every comparison
        raise ValueError(f"--cfg-interval must be 0 <= T_MIN <= T_MAX <= 1, got {t_min} {t_max}")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite deletes it: give one of them")


def _run_config(ckpt: str) -> dict:
    """The resolved config of the run that produced `ckpt` (a run directory or a model folder; {} otherwise)."""
    return run_config(ckpt)


def _decode_only_rae(run_rae: RAEConfig, decoder, stats) -> RAE:
    """Decoding needs the encoder's pixel normalisation only; read it without loading encoder weights where the
    encoder's family fixes it (the Hub encoders), else build the encoder (the small digits encoder)."""
    options = run_rae.encoder.options
    if run_rae.encoder.name in PIXEL_NORMALISATION and "image_mean" not in options:
        mean, std = PIXEL_NORMALISATION[run_rae.encoder.name]
        return RAE(None, decoder, stats, image_mean=mean, image_std=std)
    return RAE(build_rae_encoder(run_rae), decoder, stats)


@dataclass
class Models:
    """What `load_models` returns: the backbone, the optional weak teacher and the decoding RAE, on one device."""

    model: DiTDH
    weak: DiTDH | None
    rae: RAE
    decoder: str
    stats: str | None
    shift: float | None  # the run's training shift, when known
    files: dict[str, str]  # what was read: "weights", "weak", "decoder", "stats" -> resolved file

    def non_finite_cause(self, err: NonFiniteSamples, args: argparse.Namespace) -> str:
        """The one-line error for a non-finite batch, naming what can have produced it."""
        if err.stage == "latents":
            suspects = [f"the weights {self.files['weights']}"]
            if "weak" in self.files:
                suspects.append(f"the weak weights {self.files['weak']} (--ag-scale {args.ag_scale})")
            if not self.model.is_meanflow and args.cfg_scale != 1.0:
                suspects.append(f"--cfg-scale {args.cfg_scale}")
            if args.bf16:
                suspects.append("--bf16")
        else:
            suspects = [f"the decoder {self.files['decoder']}"]
            if "stats" in self.files:
                suspects.append(f"the latent stats {self.files['stats']}")
            if args.decoder_bf16:
                suspects.append("--decoder-bf16")
        return f"{err}: check {', '.join(suspects)}; nothing was written from this batch"


def _check_finite(module: torch.nn.Module, what: str, path: str) -> None:
    """Refuse weights or statistics holding NaN or infinite values: they would sample black images."""
    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{what} {path}: '{name}' holds NaN or infinite values")


def load_backbone(spec: str, device: torch.device, meanflow: bool | None = None) -> tuple[DiTDH, str]:
    """The DiT^DH that `spec` names (run directory, model folder or weights file) on `device` in eval mode, its
    weights checked finite, and the file read. `meanflow` as in `load_dit_dh` (None: whatever the file holds)."""
    path = resolve_weights(spec)
    model = load_dit_dh(path, meanflow=meanflow).to(device).eval()
    _check_finite(model, "weights", path)
    return model, path


def load_models(ckpt: str, device: torch.device, decoder: str | None = None, stats: str | None = None,
                weak_ckpt: str | None = None, grid: tuple[float, ...] | None = None,
                rae: str | None = None) -> Models:
    """The backbone of `ckpt`, the decoding RAE (`decoder` / `stats`, or a diffusers AutoencoderRAE folder /
    Hub id `rae`; default: the run's) and the optional weak teacher, on `device`, checked finite; what
    `mfrae sample` (and `mfrae app`) generate with."""
    files = {"weights": resolve_weights(ckpt)}  # a missing --ckpt is named before anything it would provide
    run_config = _run_config(ckpt)
    run_rae = from_dict(RAEConfig, run_config.get("rae") or {}, "rae")  # the run's part of its PipelineConfig
    if rae and (decoder or stats):
        raise ValueError("--rae (a diffusers AutoencoderRAE) holds the decoder and the statistics: "
                         "drop --decoder / --stats")
    pretrained = rae or (None if decoder or stats else run_rae.pretrained)
    decoder_spec = pretrained or decoder or run_rae.decoder
    stats_spec = pretrained or stats or run_rae.stats
    if not decoder_spec:
        raise ValueError("no RAE decoder: pass --decoder or --rae (or sample from a run directory whose config "
                         "names rae.decoder or rae.pretrained)")
    model, _ = load_backbone(files["weights"], device)  # a resolved file resolves to itself
    if grid is not None and not model.is_meanflow:
        raise ValueError("--grid is a MeanFlow time grid; a teacher samples on its shifted ODE grid (--steps, --shift)")
    weak = None
    if weak_ckpt:
        weak, files["weak"] = load_backbone(weak_ckpt, device, meanflow=False)
    if pretrained:
        files["decoder"] = files["stats"] = str(pretrained)
        decoding = RAE.from_pretrained(pretrained, with_encoder=False)
        decoder_model, latent_stats = decoding.decoder, decoding.stats
    else:
        files["decoder"] = resolve_weights(decoder_spec)
        decoder_model = load_vit_decoder(files["decoder"])
        latent_stats = None
        if stats_spec:
            files["stats"] = resolve_weights(stats_spec)
            latent_stats = load_latent_stats(files["stats"])
        decoding = _decode_only_rae(run_rae, decoder_model, latent_stats)
    decoding = decoding.to(device).eval()  # moves the decoder and the statistics in place
    _check_finite(decoder_model, "decoder", files["decoder"])
    if latent_stats is not None:
        _check_finite(latent_stats, "latent stats", files["stats"])
    # A teacher samples on the time grid it was trained with, unless told otherwise.
    shift = (run_config.get("objective") or {}).get("shift")
    return Models(model, weak, decoding, str(decoder_spec), str(stats_spec) if stats_spec else None, shift, files)


def _load_models(args: argparse.Namespace, device: torch.device) -> Models:
    return load_models(args.ckpt, device, args.decoder, args.stats, args.weak_ckpt, args.grid, args.rae)


def _outputs(root: Path) -> list[Path]:
    """The files in `root` that `mfrae sample` writes (or a killed run left), whichever run wrote them."""
    found = [root / name for name in _OUTPUT_FILES if (root / name).is_file()]
    for folder, patterns in _OUTPUT_FOLDERS.items():
        found += sorted(p for pattern in patterns for p in (root / folder).glob(pattern) if p.is_file())
    return found


def _remove_outputs(root: Path) -> None:
    for path in _outputs(root):
        path.unlink()
    for folder in _OUTPUT_FOLDERS:
        if (root / folder).is_dir() and not any((root / folder).iterdir()):
            (root / folder).rmdir()


def _prepare_output(plan: ShardPlan, fingerprint: dict, resume: bool, overwrite: bool) -> bool:
    """Write DIR/plan.json for a new run (True), or for --resume check that it describes the same images (False).

    A new run refuses a folder holding another run's outputs unless `overwrite`, which deletes them first."""
    path = plan.root / PLAN_FILE
    if path.is_file() and resume:
        before = json.loads(path.read_text())
        changed = sorted(k for k in {*before, *fingerprint} if before.get(k) != fingerprint.get(k))
        if changed:
            differences = ", ".join(f"{k} was {before.get(k)!r}, now {fingerprint.get(k)!r}" for k in changed)
            raise ValueError(f"--resume with other settings than {path}: {differences}")
        plan.remove_partial_files()
        return False
    earlier = _outputs(plan.root)
    if earlier and not overwrite:
        if path.is_file():
            raise ValueError(f"{plan.root} holds an earlier sampling run: pass --resume to continue it, "
                             "--overwrite to replace it, or another --out")
        what = "nothing to resume" if resume else "they would be mixed with the new samples"
        raise ValueError(f"{plan.root} holds another run's outputs without a {PLAN_FILE} ({earlier[0]} and "
                         f"{len(earlier) - 1} more; {what}): pass --overwrite to delete them, or another --out")
    _remove_outputs(plan.root)
    (plan.root / SHARDS).mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(fingerprint, indent=2))
    return True


def _on_main(info: DistInfo, fn, *fn_args):
    """Run `fn` on rank 0 and give every process its result; a ValueError (or a failed write) there is raised
    everywhere, as one line."""
    result, error = None, None
    if info.is_main:
        try:
            result = fn(*fn_args)
        except ValueError as err:
            error = str(err)
        except OSError as err:
            error = f"cannot write {err.filename or 'the output folder'}: {describe(err)}"
    result, error = gather_objects((result, error), info)[0]
    if error is not None:
        raise ValueError(error)
    return result


class SamplingStopped(Exception):
    """A SIGINT / SIGTERM stopped this process between two batches; complete shards are kept."""

    def __init__(self, signum: int, plan: ShardPlan, info: DistInfo):
        super().__init__(f"stopped by signal {signum}")
        self.signum, self.plan, self.info = signum, plan, info


def run(args: argparse.Namespace) -> int:
    _check_arguments(args)
    try:
        with StopSignals("mfrae sample") as stop, process_group(args.device) as info:
            return _sample(args, info, stop)
    except SamplingStopped as stopped:
        if stopped.info.is_main:
            plan = stopped.plan
            done = plan.num - sum(len(plan.indices(k)) for k in plan.missing())
            print(f"mfrae sample: stopped by {signal_name(stopped.signum)}, {done} of {plan.num} images in complete "
                  f"shards kept; resume with: {_resume_command(args, stopped.info)}", file=sys.stderr)
        return exit_status(stopped.signum)


def _resume_command(args: argparse.Namespace, info: DistInfo) -> str:
    command = getattr(args, "command_line", None) or ["mfrae", *sys.argv[1:]]
    return resume_command(command, info.world_size, int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or None)


def _sample(args: argparse.Namespace, info: DistInfo, stop: StopSignals | None = None) -> int:
    from tqdm.auto import tqdm

    device = info.device if info.enabled else torch.device(args.device)
    models = _load_models(args, device)
    model, rae = models.model, models.rae
    labels = class_labels(args.labels, args.num, model.num_classes, args.seed)
    settings = SampleSettings(steps=args.steps, batch_size=args.batch_size,
                              shift=args.shift if args.shift is not None else models.shift, method=args.method,
                              cfg_scale=args.cfg_scale, cfg_interval=tuple(args.cfg_interval),
                              autoguidance_scale=args.ag_scale, decoder_bf16=args.decoder_bf16,
                              grid=args.grid, bf16=args.bf16)
    # What the images depend on; batch size, device, compile and process count only change rounding.
    fingerprint = {"ckpt": str(args.ckpt), "weak_ckpt": args.weak_ckpt, "decoder": models.decoder,
                   "stats": models.stats, "kind": "meanflow" if model.is_meanflow else "teacher",
                   "num": args.num, "shard_size": args.shard_size, "labels": args.labels, "seed": args.seed,
                   "png": not args.no_png, **{k: v for k, v in asdict(settings).items() if k != "batch_size"}}
    fingerprint = json.loads(json.dumps(fingerprint))  # tuples -> lists, as read back from plan.json
    out = Path(args.out)
    plan = ShardPlan(out, args.num, args.shard_size)
    fresh = _on_main(info, _prepare_output, plan, fingerprint, args.resume, args.overwrite)
    missing = _on_main(info, plan.missing)
    mine = missing[info.rank :: info.world_size]
    if args.compile:
        model, rae.decoder = torch.compile(model), torch.compile(rae.decoder)

    total = sum(len(plan.indices(k)) for k in mine)
    bar = tqdm(total=total, unit="img", unit_scale=info.world_size, disable=not info.is_main or total == 0,
               desc=f"sampling ({info.world_size} process{'es' if info.enabled else ''}, counts scaled from rank 0)")
    start = time.perf_counter()

    pieces = [b for k in mine for b in batches(plan.indices(k), args.batch_size)]
    noise = prefetched_noise(models.model.latent_shape, pieces, args.seed, prefetch=device.type != "cpu")

    def shard_batches(k: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for b in batches(plan.indices(k), args.batch_size):
            if stop is not None and stop.requested:  # between batches: the shard being written is dropped
                raise SamplingStopped(stop.signum, plan, info)
            y = labels[b.start : b.stop]
            images = generate_batch(model, rae, y, b, settings, args.seed, models.weak, device, next(noise),
                                    check_finite=True)
            images = to_uint8_nhwc(images)
            if not args.no_png:
                save_pngs(out / "images", images, b.start, args.num)
            bar.update(len(b))
            yield images, y.numpy()

    try:
        for k in mine:
            write_adm_npz(plan.path(k), len(plan.indices(k)), shard_batches(k))
    except NonFiniteSamples as err:
        bar.close()
        if fresh and info.world_size == 1:
            _remove_outputs(out)  # a new run stopped by bad weights leaves no half run behind
        raise ValueError(models.non_finite_cause(err, args)) from None
    except SamplingStopped:
        bar.close()
        raise
    except OSError as err:  # a full or read-only disk: the shard being written was dropped, complete ones stay
        bar.close()
        raise ValueError(_write_failure(err, plan, args, info)) from None
    bar.close()
    seconds = time.perf_counter() - start
    done = gather_objects(seconds, info)  # also the barrier before rank 0 assembles
    if info.is_main:
        try:
            _assemble(plan, labels, args, fingerprint, generated=sum(len(plan.indices(k)) for k in missing),
                      seconds=max(done), world_size=info.world_size)
        except OSError as err:
            raise ValueError(_write_failure(err, plan, args, info)) from None
    return 0


def _write_failure(err: OSError, plan: ShardPlan, args: argparse.Namespace, info: DistInfo) -> str:
    """One line for a write that failed: the file, the cause, what is kept and the command that continues."""
    kept = plan.num - sum(len(plan.indices(k)) for k in plan.missing())
    return (f"cannot write {err.filename or plan.root}: {describe(err)}; {kept} of {plan.num} images in complete "
            f"shards kept: free space (or make {plan.root} writable) and resume with: {_resume_command(args, info)}")


def _assemble(plan: ShardPlan, labels: Tensor, args: argparse.Namespace, fingerprint: dict, generated: int,
              seconds: float, world_size: int) -> None:
    """samples.npz, labels.txt, grid.png and sampling.json from the complete shards (rank 0)."""
    out = plan.root
    write_adm_npz(out / "samples.npz", plan.num, plan.read_all())
    if not args.no_png:
        (out / "images").mkdir(exist_ok=True)
        atomic_write_text(out / "images" / "labels.txt", "".join(f"{int(v)}\n" for v in labels))
    first = itertools.islice(plan.read_all(), math.ceil(64 / plan.shard_size))
    save_image_grid(from_uint8_nhwc(np.concatenate([images for images, _ in first])[:64]), out / "grid.png")
    steps, heun = fingerprint["steps"], fingerprint["kind"] == "teacher" and args.method == "heun"
    report = {
        **fingerprint, "nfe": steps * (2 if heun else 1), "batch_size": args.batch_size, "device": str(args.device),
        "compile": args.compile, "world_size": world_size, "resumed": args.resume, "generated": generated,
        "seconds": seconds, "images_per_second": generated / seconds if seconds > 0 else 0.0,
    }
    atomic_write_text(out / "sampling.json", json.dumps(report, indent=2))
    print(f"wrote {plan.num} images to {out} ({report['images_per_second']:.1f} images/s in this launch, "
          f"decoding included)")
