"""`mfrae stats`: per-element latent statistics {mean, var} of a dataset under a frozen encoder.

    mean = (1/N) sum_n z_n,     var = (1/N) sum_n (z_n - mean)^2      (population variance, shape [C, g, g])

accumulated exactly in float64 over the whole dataset (and over all processes under torchrun), so the result
does not depend on batch size or order. (The official script keeps a momentum-0.1 running estimate instead,
which the RAE authors note differs from run to run.) The file is what `rae.stats` expects; a .safetensors file
also names the encoder (name and fingerprint), so an RAE with another encoder refuses it (the `.pt` output keeps
the authors' two-tensor layout and names none). An existing file is never replaced without `--overwrite`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from mfrae.checkpoint import save_latent_stats
from mfrae.config import to_dict
from mfrae.errors import ConfigError
from mfrae.fileio import commit, temp_path
from mfrae.models.encoders import RepresentationEncoder, tokens_to_grid
from mfrae.models.rae import LatentStats

STATS_FILE = "stats.safetensors"


@torch.no_grad()
def latent_statistics(
    encoder: RepresentationEncoder, dataset: Dataset, batch_size: int = 64, device: torch.device | str = "cpu",
    num_workers: int = 0, rank: int = 0, world_size: int = 1, max_images: int | None = None, progress: bool = False,
) -> LatentStats:
    """Exact mean and population variance of the raw encoder latents (rank r handles items r, r + W, ...)."""
    count = len(dataset) if max_images is None else min(len(dataset), max_images)
    indices = list(range(rank, count, world_size))
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers)
    encoder = encoder.to(device).eval()
    sum_z = sum_sq = None
    seen = torch.zeros((), dtype=torch.float64, device=device)
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc="latent statistics")
    for images, _ in loader:
        z = tokens_to_grid(encoder(images.to(device))).double()
        if sum_z is None:
            sum_z, sum_sq = torch.zeros_like(z[0]), torch.zeros_like(z[0])
        sum_z += z.sum(0)
        sum_sq += z.square().sum(0)
        seen += z.shape[0]
    if sum_z is None:
        raise ValueError("no images to compute statistics from")
    if world_size > 1:
        for value in (sum_z, sum_sq, seen):
            dist.all_reduce(value)
    mean = sum_z / seen
    var = (sum_sq / seen - mean.square()).clamp_min(0)
    return LatentStats(mean.float().cpu(), var.float().cpu(), encoder_name=encoder.name,
                       encoder_fingerprint=encoder.fingerprint())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="preset or YAML file: its `data` and `rae.encoder` are used")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--out", required=True, help=f"output folder (writes {STATS_FILE}) or a .safetensors / .pt file")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-images", type=int, default=None, help="use only the first N images")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing statistics file")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved data and rae sections and exit (nothing is read or written)")


def run(args: argparse.Namespace) -> int:
    from mfrae.distributed import process_group
    from mfrae.pipeline import build_data, build_rae_encoder, load_pipeline_config

    for option, value in (("--batch-size", args.batch_size), ("--max-images", args.max_images)):
        if value is not None and value < 1:
            raise ValueError(f"{option} must be >= 1, got {value}")
    cfg = load_pipeline_config(args.config, args.set)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    out = Path(args.out)
    path = out if out.suffix in (".safetensors", ".pt") else out / STATS_FILE
    if path.exists() and not args.overwrite:  # checked before the (long) pass over the data
        raise ConfigError(f"{path} exists (statistics other runs may use); pass --overwrite to replace it")
    with process_group() as info:
        stats = latent_statistics(
            build_rae_encoder(cfg.rae), build_data(cfg.data), args.batch_size, info.device, cfg.data.num_workers,
            info.rank, info.world_size, args.max_images, progress=info.is_main,
        )
    if info.is_main:
        if path.suffix == ".pt":  # the official stat.pt layout, written atomically like the safetensors file
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_path(path)
            torch.save(stats.to_dict(), tmp)
            commit(tmp, path)
        else:
            save_latent_stats(stats, path)
        print(f"wrote {path}: latent shape {list(stats.shape)}, mean |mu| {stats.mean.abs().mean():.4f}, "
              f"mean var {stats.var.mean():.4f}")
    return 0
