"""`mfrae cache`: encode a dataset once with the frozen RAE encoder; later stages train from the shards.

The cache stores raw encoder latents [C, g, g] (before the latent normalisation), so one cache serves any
statistics file. Train from it with `--set data.kind=latents --set data.options.cache_dir=DIR`: the stage
normalises with `rae.stats` and checks the encoder fingerprint. With `--flip-both` the mirrored images are
encoded too, and `data.options.random_flip=true` picks one of the two per sample.
"""

from __future__ import annotations

import argparse

import torch
import yaml

from mfrae.config import to_dict
from mfrae.data import build_latent_cache
from mfrae.models.encoders import tokens_to_grid


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="preset or YAML file: its `data` and `rae.encoder` are used")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--rae", metavar="FOLDER_OR_HUB_ID",
                        help="encode with a diffusers AutoencoderRAE's encoder (sets rae.pretrained)")
    parser.add_argument("--out", required=True, help="cache directory (an interrupted build resumes)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--flip-both", action="store_true", help="also encode the mirrored images")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved data and rae sections and exit (nothing is read or written)")


def run(args: argparse.Namespace) -> int:
    from mfrae.distributed import process_group
    from mfrae.pipeline import build_data, build_rae_encoder, load_pipeline_config

    overrides = args.set + ([f"rae.pretrained={args.rae}"] if args.rae else [])
    cfg = load_pipeline_config(args.config, overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    with process_group() as info:
        encoder = build_rae_encoder(cfg.rae).to(info.device)
        index = build_latent_cache(
            # Flips are stored explicitly (--flip-both), never baked in at random.
            build_data(cfg.data, random_flip=False), lambda images: tokens_to_grid(encoder(images.to(info.device))).cpu(), args.out,
            shard_size=args.shard_size, batch_size=args.batch_size, flip_both=args.flip_both,
            encoder_name=encoder.name, encoder_fingerprint=encoder.fingerprint(), dtype=getattr(torch, args.dtype),
            num_workers=cfg.data.num_workers, rank=info.rank, world_size=info.world_size, progress=info.is_main,
        )
    if info.is_main:
        print(f"cache {args.out}: {index['count']} latents of shape {index['latent_shape']} in {index['num_shards']} shards")
    return 0
