"""Run directories and crash-safe checkpoints.

    RUN_DIR/
      config.yaml          the fully resolved config of the stage
      run.json             command lines, package / torch versions, git revision, start times
      metrics.jsonl        one JSON object per logged step
      samples/             sample grids from fixed noise
      checkpoints/
        step_00001000/     model.safetensors, ema.safetensors, state.pt (optimizer, step, RNG, data position, ...)
        latest             name of the newest complete checkpoint

A checkpoint is written into a temporary folder (every file flushed and fsynced) and renamed into place; only
then does `latest` move (written to a temporary file and renamed). A crash at any moment therefore leaves
`latest` naming a complete checkpoint. The last `keep_last` checkpoints are kept.

`resolve_weights(spec)` turns "a run directory, a checkpoint folder or a file" into the weights file to load.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import mfrae
from mfrae.config import to_dict, write_yaml
from mfrae.errors import CheckpointError
from mfrae.fileio import atomic_write_text, fsync_dir, fsync_file

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "state.pt"


def git_revision() -> str | None:
    try:
        root = Path(mfrae.__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    # -- bookkeeping --------------------------------------------------------------------------

    def start(self, config, command: list[str], resume: bool) -> None:
        """Create the folders, write config.yaml and record the command (appended on resume)."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(exist_ok=True)
        self.samples.mkdir(exist_ok=True)
        write_yaml(to_dict(config), self.root / "config.yaml")
        info_path = self.root / "run.json"
        info = json.loads(info_path.read_text()) if resume and info_path.exists() else {"launches": []}
        info["launches"].append(
            {
                "command": command,
                "resume": resume,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "mfrae": mfrae.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
                "git_revision": git_revision(),
                "host": platform.node(),
                "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            }
        )
        atomic_write_text(info_path, json.dumps(info, indent=2))

    def log_metrics(self, record: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, after_step: int) -> None:
        """On resume, drop records past the checkpoint so metrics.jsonl reads like one uninterrupted run."""
        if not self.metrics.exists():
            return
        kept = [line for line in self.metrics.read_text().splitlines() if line and json.loads(line).get("step", 0) <= after_step]
        atomic_write_text(self.metrics, "".join(line + "\n" for line in kept))

    # -- checkpoints --------------------------------------------------------------------------

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint `latest` names, or the newest complete one if `latest` is missing or stale."""
        pointer = self.checkpoints / LATEST
        if pointer.exists():
            candidate = self.checkpoints / pointer.read_text().strip()
            if (candidate / STATE_FILE).exists():
                return candidate
        complete = sorted(p for p in self.checkpoints.glob("step_*") if (p / STATE_FILE).exists() and "." not in p.name)
        return complete[-1] if complete else None

    def save_checkpoint(self, step: int, writers: dict[str, callable], keep_last: int) -> Path:
        """Write one checkpoint: `writers` maps file names to functions writing that file at a given path."""
        final = self.checkpoints / f"step_{step:08d}"
        tmp = self.checkpoints / f".step_{step:08d}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, write in writers.items():
            write(tmp / name)
            fsync_file(tmp / name)
        fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. the final step after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(self.checkpoints)
        atomic_write_text(self.checkpoints / LATEST, final.name)
        self._prune(keep_last, keep=final)
        return final

    def _prune(self, keep_last: int, keep: Path) -> None:
        done = sorted(p for p in self.checkpoints.glob("step_*") if "." not in p.name)
        for old in done[:-keep_last]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.checkpoints.glob(".step_*.tmp-*"):  # left by a crash mid-write
            shutil.rmtree(stale, ignore_errors=True)


def load_state(path: Path) -> dict:
    """Read a training state file (tensors and plain containers only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot read training state ({type(err).__name__}: {err})") from None


def resolve_weights(spec: str | Path, which: str = "ema") -> str:
    """A weights file from a run directory (its latest checkpoint), a checkpoint folder, or a file / hf:// name."""
    spec = str(spec)
    path = Path(spec)
    if spec.startswith("hf://") or path.is_file():
        return spec
    if path.is_dir():
        run = RunDir(path)
        if (path / CHECKPOINTS).is_dir():
            ckpt = run.latest_checkpoint()
            if ckpt is None:
                raise FileNotFoundError(f"{spec}: run directory without a complete checkpoint")
            return str(ckpt / f"{which}.safetensors")
        if (path / f"{which}.safetensors").is_file():
            return str(path / f"{which}.safetensors")
        for name in ("stats.safetensors", "stat.pt"):
            if (path / name).is_file():
                return str(path / name)
        raise FileNotFoundError(f"{spec}: a folder, but neither a run directory nor a checkpoint")
    raise FileNotFoundError(f"no such file or run directory: {spec}")


def command_line() -> list[str]:
    return [Path(sys.argv[0]).name, *sys.argv[1:]]
