"""`mfrae train STAGE --config PRESET_OR_FILE [--set key=value ...] --out RUN_DIR [--resume]`."""

from __future__ import annotations

import argparse
import os
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
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from its newest checkpoint that loads (newer broken ones "
                             "are skipped and named)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    from mfrae.interrupts import StopSignals, exit_status, resume_command, signal_name
    from mfrae.train.engine import TrainingDiverged, TrainingStopped
    from mfrae.train.runs import RunDir
    from mfrae.train.stages import load_stage_config, train_stage

    cfg = load_stage_config(args.stage, args.config, args.set)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    if not args.resume and RunDir(args.out).latest_checkpoint() is not None:
        raise ValueError(f"{args.out} already holds a run; pass --resume to continue it, or choose another --out")
    try:
        with StopSignals("mfrae train") as stop:
            last = train_stage(cfg, Path(args.out), resume=args.resume, command=args.command_line, stop=stop)
    except TrainingDiverged as err:
        print(f"mfrae train: {err}", file=sys.stderr)
        return 3
    except TrainingStopped as stopped:
        info = stopped.info
        if info.is_main:
            again = resume_command(args.command_line, info.world_size, int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or None)
            print(f"mfrae train: stopped by {signal_name(stopped.signum)} after step {stopped.step}, checkpoint "
                  f"{stopped.checkpoint}; resume with: {again}", file=sys.stderr)
        return exit_status(stopped.signum)
    if last is not None:
        print(f"done: {last}")
    return 0
