"""`mfrae train STAGE --config PRESET_OR_FILE [--set key=value ...] --out RUN_DIR [--resume]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from mfrae.config import preset_names, to_dict
from mfrae.train.config import STAGES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("stage", choices=STAGES, help="decoder | teacher | cmt | mfd | mft")
    parser.add_argument("--config", required=True, help=f"a YAML file or a preset: {', '.join(preset_names())}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=2e-4 (repeatable)")
    parser.add_argument("--out", required=True, help="run directory (config, checkpoints, metrics, samples)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    from mfrae.train.engine import TrainingDiverged
    from mfrae.train.runs import RunDir
    from mfrae.train.stages import load_stage_config, train_stage

    cfg = load_stage_config(args.stage, args.config, args.set)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    if not args.resume and RunDir(args.out).latest_checkpoint() is not None:
        raise ValueError(f"{args.out} already holds a run; pass --resume to continue it, or choose another --out")
    try:
        last = train_stage(cfg, Path(args.out), resume=args.resume, command=args.command_line)
    except TrainingDiverged as err:
        print(f"mfrae train: {err}", file=sys.stderr)
        return 3
    if last is not None:
        print(f"done: {last}")
    return 0
