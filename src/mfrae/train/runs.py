"""Run directories and crash-safe checkpoints.

    RUN_DIR/
      run.lock             held (flock) by the process that trains into the directory; names its pid and host
      config.yaml          the fully resolved config of the stage
      run.json             command lines, package / torch versions, git revision, start times, resumed changes
      metrics.jsonl        one JSON object per logged step
      samples/             sample grids from fixed noise
      checkpoints/
        step_00001000/     model.safetensors, ema.safetensors, state.pt (optimizer, step, RNG, data position, ...)
        latest             name of the newest complete checkpoint

A checkpoint is written into a temporary folder (every file flushed and fsynced) and renamed into place; only
then does `latest` move (written to a temporary file and renamed). A crash at any moment therefore leaves
`latest` naming a complete checkpoint, and a failed write (full or read-only disk) raises `CheckpointError`
with the temporary folder removed and `latest` unchanged. The last `keep_last` checkpoints are kept.

One process at a time: `claim` takes an exclusive lock for the run's lifetime and checks that the directory
may hold the run (a new run: a new or empty directory; `--resume`: a complete checkpoint). Run files are
never written through symbolic links. The rules, in the user's terms: docs/checkpoints.md, section 12.

`resolve_weights(spec)` turns "a run directory, a checkpoint folder or a file" into the weights file to load
(a model folder of `mfrae export`, local or on the Hub, into that folder); `run_config(spec)` gives the config
that sampling reads from a run directory or a model folder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

import mfrae
from mfrae.checkpoint import download_model_folder, hub_repo_id, is_model_folder, read_model_folder
from mfrae.config import to_dict
from mfrae.errors import CheckpointError, ConfigError
from mfrae.fileio import append_text, atomic_write_text, fsync_dir, fsync_file

log = logging.getLogger("mfrae")

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "state.pt"
LOCK_FILE = "run.lock"
HOST = platform.node()

# Config keys that fix the trained network: a resume that changes one of them is refused.
ARCHITECTURE_KEYS = ("stage", "model.preset", "model.options")

_STEP_DIR = re.compile(r"step_\d{8,}")
_TEMP_DIR = ".step_*.tmp-*"  # .step_00001000.tmp-PID@HOST (and .step_00001000.old.tmp-PID@HOST)


def git_revision() -> str | None:
    try:
        root = Path(mfrae.__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def describe(err: BaseException) -> str:
    """The cause of a failed file operation in one line: the OS error and its errno name, or the writer's message."""
    if isinstance(err, OSError) and err.errno is not None:
        text = f"{err.strerror or os.strerror(err.errno)} [{errno.errorcode.get(err.errno, err.errno)}]"
    else:
        text = f"{type(err).__name__}: {err}"
    return " ".join(text.split())


def _alive(pid: int) -> bool:
    """Whether a process `pid` exists on this host (signal 0 checks without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OverflowError:  # beyond any pid
        return False
    return True


def _abandoned(owner: str) -> bool:
    """Whether a temporary file tagged `PID` or `PID@HOST` belongs to this process or to a dead one on this host.

    Temporaries of live processes and of other hosts (whose processes cannot be checked from here) are not."""
    pid, _, host = owner.partition("@")
    if not pid.isdigit() or int(pid) < 1 or (host and host != HOST):
        return False
    return int(pid) == os.getpid() or not _alive(int(pid))


def _flatten(data: dict, prefix: str = "") -> dict:
    """{"a.b": value} for the leaves of nested mappings (an empty mapping has no leaves)."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(old, new) -> dict[str, tuple]:
    """{dotted key: (old value, new value)} for every value that differs between two configs (dataclasses or
    the dicts of config.yaml; both are compared in their YAML form; a key absent on one side reads as None)."""
    old, new = (_flatten(yaml.safe_load(yaml.safe_dump(to_dict(c), sort_keys=False)) or {}) for c in (old, new))
    keys = [*new, *(k for k in old if k not in new)]
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)}


def architecture_changes(changes: dict[str, tuple]) -> dict[str, tuple]:
    """The entries of `config_changes` under `ARCHITECTURE_KEYS`."""
    return {k: v for k, v in changes.items() if any(k == a or k.startswith(a + ".") for a in ARCHITECTURE_KEYS)}


def format_changes(changes: dict[str, tuple]) -> str:
    """"key: old -> new; ..." on one line."""
    return "; ".join(f"{k}: {json.dumps(old)} -> {json.dumps(new)}" for k, (old, new) in changes.items())


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._lock_fd: int | None = None

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def info_file(self) -> Path:
        return self.root / "run.json"

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK_FILE

    # -- claiming the directory ---------------------------------------------------------------

    def claim(self, resume: bool) -> Path | None:
        """Lock the directory for this run and check that it may hold it; returns the checkpoint to resume from.

        A new run needs a directory that does not exist or holds nothing but the lock file; `--resume` needs a
        complete checkpoint. Refusals raise `ConfigError` naming the directory, and nothing but the lock file is
        written. Temporary checkpoint folders of dead processes are removed (they may be filling the disk).
        """
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"{self.root}: not a directory; choose another --out")
        if resume and not self.root.is_dir():
            raise ConfigError(f"--resume: {self.root} does not exist; nothing to resume (check --out)")
        self.lock()
        try:
            ckpt = self._check_usable(resume)
            self.remove_abandoned()
        except BaseException:
            self.unlock()
            raise
        return ckpt

    def _check_usable(self, resume: bool) -> Path | None:
        ckpt = self.latest_checkpoint()
        if resume:
            if ckpt is None:
                raise ConfigError(f"--resume: {self.root} holds no complete checkpoint, nothing to resume; start a "
                                  "new run without --resume in a new or empty directory")
            return ckpt
        if ckpt is not None:
            raise ConfigError(f"{self.root} already holds a run; pass --resume to continue it, or choose another --out")
        found = sorted(p.name for p in self.root.iterdir() if p.name != LOCK_FILE)
        if found:
            shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
            raise ConfigError(f"{self.root} is not empty ({shown}) and holds no checkpoint to resume: a new run needs "
                              "a new or empty directory; choose another --out or remove these files")
        return None

    def lock(self) -> None:
        """Take the exclusive lock of the directory (flock on run.lock), held until `unlock` or the process ends.

        Raises `ConfigError` naming the holder's pid and host when another process holds it."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise CheckpointError(f"{self.lock_file}: cannot create the run lock ({describe(err)})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise ConfigError(f"{self.root} is in use by another run ({holder}); wait for it to end or choose "
                              "another --out") from None
        except OSError as err:
            os.close(fd)
            raise CheckpointError(f"{self.lock_file}: cannot lock ({describe(err)})") from None
        try:  # best effort: who holds it, for the refusal message of others
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": HOST}).encode(), 0)
        except OSError:
            pass
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release the lock (closing the file releases the flock; the file stays, so no one races its removal)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def remove_abandoned(self) -> list[Path]:
        """Remove the temporary checkpoint folders and partial files of this process and of dead processes on
        this host; those of live processes and of other hosts are left alone. Returns what was removed."""
        removed = []
        for tmp in self.checkpoints.glob(_TEMP_DIR):
            if _abandoned(tmp.name.split(".tmp-", 1)[1]):
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
        for folder in (self.root, self.checkpoints):
            for partial in folder.glob(".*.partial"):  # mfrae.fileio.temp_path: .NAME.PID.partial
                if _abandoned(partial.name.rsplit(".", 2)[-2]):
                    partial.unlink(missing_ok=True)
                    removed.append(partial)
        return removed

    # -- bookkeeping --------------------------------------------------------------------------

    def start(self, config, command: list[str], resumed_at: int | None = None,
              changed: dict[str, tuple] | None = None) -> None:
        """Write the run files of a launch: config.yaml, run.json (a launch appended on resume, with the config
        changes) and, on a resume from step `resumed_at`, metrics.jsonl without its records past that step.

        Everything is read and checked before anything is written."""
        resume = resumed_at is not None
        info = self._read_run_info() if resume else {"launches": []}
        metrics = self._metrics_up_to(resumed_at) if resume else None
        launch = {
            "command": command,
            "resume": resume,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "mfrae": mfrae.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "git_revision": git_revision(),
            "host": HOST,
            "pid": os.getpid(),
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        }
        if resume:
            launch["resumed_at"] = resumed_at
        if changed:
            launch["changed"] = {key: [old, new] for key, (old, new) in changed.items()}
        info["launches"].append(launch)
        for folder in (self.checkpoints, self.samples):
            try:
                folder.mkdir(exist_ok=True)
            except OSError as err:
                raise CheckpointError(f"{folder}: cannot create ({describe(err)})") from None
        self._write(self.config_file, yaml.safe_dump(to_dict(config), sort_keys=False))
        self._write(self.info_file, json.dumps(info, indent=2))
        if metrics is not None:
            self._write(self.metrics, metrics)

    def saved_config(self) -> dict | None:
        """The run's config.yaml as a dict (None when there is none)."""
        if not self.config_file.exists():
            return None
        try:
            data = yaml.safe_load(self.config_file.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise CheckpointError(f"{self.config_file}: unreadable ({describe(err)})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{self.config_file}: not a mapping of config sections")
        return data

    def _read_run_info(self) -> dict:
        if not self.info_file.exists():
            return {"launches": []}
        try:
            info = json.loads(self.info_file.read_text())
            if not isinstance(info.get("launches"), list):
                raise ValueError("no list of launches")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as err:
            raise CheckpointError(f"{self.info_file}: unreadable run record ({describe(err)}); repair or delete it "
                                  "to resume") from None
        return info

    def _write(self, path: Path, text: str) -> None:
        try:
            atomic_write_text(path, text)
        except OSError as err:
            raise CheckpointError(f"{path}: cannot write ({describe(err)})") from None

    def log_metrics(self, record: dict) -> None:
        try:
            append_text(self.metrics, json.dumps(record) + "\n")
        except OSError as err:
            link = self.metrics.is_symlink()
            cause = "a symbolic link; run files are not written through links" if link else describe(err)
            raise CheckpointError(f"{self.metrics}: cannot append ({cause})") from None

    def _metrics_up_to(self, step: int) -> str | None:
        """metrics.jsonl without its records past `step` (None: no file). An unreadable last line (a crash
        while writing it) is dropped with a warning; an unreadable line before it is refused, naming it."""
        if not self.metrics.exists():
            return None
        try:
            text = self.metrics.read_bytes().decode("utf-8", errors="replace")
        except OSError as err:
            raise CheckpointError(f"{self.metrics}: unreadable ({describe(err)})") from None
        numbered = [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
        kept = []
        for i, (number, line) in enumerate(numbered):
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                    raise ValueError("not a record with an integer 'step'")
            except ValueError as err:
                if i == len(numbered) - 1:
                    log.warning("%s:%d: dropped an incomplete last record (a crash while writing it?)",
                                self.metrics, number)
                    continue
                raise CheckpointError(f"{self.metrics}:{number}: corrupt record ({describe(err)}); repair or delete "
                                      "that line to resume") from None
            if record["step"] <= step:
                kept.append(line)
        return "".join(line + "\n" for line in kept)

    def truncate_metrics(self, after_step: int) -> None:
        """Drop records past `after_step` so metrics.jsonl reads like one uninterrupted run (done by `start` on
        resume); the same checks as there."""
        kept = self._metrics_up_to(after_step)
        if kept is not None:
            self._write(self.metrics, kept)

    # -- checkpoints --------------------------------------------------------------------------

    def _complete(self) -> list[Path]:
        """The complete checkpoint folders, oldest first."""
        folders = self.checkpoints.glob("step_*")
        return sorted(p for p in folders if _STEP_DIR.fullmatch(p.name) and (p / STATE_FILE).exists())

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint `latest` names, or the newest complete one if `latest` is missing or stale."""
        pointer = self.checkpoints / LATEST
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        if _STEP_DIR.fullmatch(name) and (self.checkpoints / name / STATE_FILE).exists():
            return self.checkpoints / name
        complete = self._complete()
        return complete[-1] if complete else None

    def resume_candidates(self) -> list[Path]:
        """The complete checkpoints to try on --resume, in order: the one `latest` names, then the others from
        the newest to the oldest."""
        latest = self.latest_checkpoint()
        rest = [p for p in reversed(self._complete()) if p != latest]
        return ([latest] if latest is not None else []) + rest

    def save_checkpoint(self, step: int, writers: dict[str, callable], keep_last: int) -> Path:
        """Write one checkpoint: `writers` maps file names to functions writing that file at a given path.

        On any failure: `CheckpointError` naming the file and the cause, the temporary folder removed, the
        previous checkpoint still `latest`."""
        final = self.checkpoints / f"step_{step:08d}"
        owner = f"{os.getpid()}@{HOST}"
        tmp = self.checkpoints / f".{final.name}.tmp-{owner}"
        aside = self.checkpoints / f".{final.name}.old.tmp-{owner}"
        previous = self.latest_checkpoint()
        doing = f"creating {tmp.name}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name, write in writers.items():
                doing = f"writing {name}"
                write(tmp / name)
                fsync_file(tmp / name)
            fsync_dir(tmp)
            doing = "renaming it into place"
            if final.exists():  # re-saving a step (e.g. the final step after a resume): set the old one aside
                os.replace(final, aside)
            os.replace(tmp, final)
            fsync_dir(self.checkpoints)
            doing = f"updating {LATEST}"
            atomic_write_text(self.checkpoints / LATEST, final.name)
        except Exception as err:  # OSError, torch's RuntimeError, safetensors' SafetensorError, ...
            free = _free_space(self.checkpoints)
            shutil.rmtree(tmp, ignore_errors=True)
            if aside.exists() and not final.exists():
                os.replace(aside, final)
            kept = f"the previous checkpoint {previous} is still latest" if previous else "no earlier checkpoint exists"
            raise CheckpointError(f"{final}: cannot write the checkpoint of step {step} "
                                  f"({doing}: {describe(err)}{free}); {kept}") from err
        shutil.rmtree(aside, ignore_errors=True)
        self._prune(keep_last, keep=final)
        return final

    def _prune(self, keep_last: int, keep: Path) -> None:
        for old in self._complete()[:-keep_last]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)
        self.remove_abandoned()


def _free_space(folder: Path) -> str:
    try:
        return f"; {shutil.disk_usage(folder).free / 2**20:.1f} MiB free there"
    except OSError:
        return ""


def _lock_holder(fd: int) -> str:
    """"pid N on host H" from a lock file (what its holder wrote there)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        return f"pid {int(holder['pid'])} on host {holder['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not recorded its pid yet"


def load_state(path: Path) -> dict:
    """Read a training state file (tensors and plain containers only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot read training state ({type(err).__name__}: {err})") from None


def resolve_weights(spec: str | Path, which: str = "ema") -> str:
    """A weights file from a run directory (its latest checkpoint), a checkpoint folder, or a file / hf:// name.

    A model folder of `mfrae export` is returned as it is (every loader of `mfrae.checkpoint` reads the file of
    its kind from it); a Hub model folder (`owner/name[@rev]` that is no local path, or `hf://owner/name`) is
    downloaded whole and its local copy returned."""
    spec = str(spec)
    path = Path(spec)
    repo = hub_repo_id(spec)
    if spec.startswith("hf://") and repo is None or path.is_file():
        return spec
    if path.is_dir():
        if is_model_folder(path):
            return spec
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
        raise FileNotFoundError(f"{spec}: a folder, but neither a run directory, a checkpoint nor a model folder")
    if repo is not None and not spec.startswith(("/", ".", "~")):
        try:
            return str(download_model_folder(repo))
        except FileNotFoundError as err:
            if spec.startswith("hf://"):
                raise
            raise FileNotFoundError(f"no such file or run directory: {spec} (nor a Hub model folder: {err})") from None
    raise FileNotFoundError(f"no such file or run directory: {spec}")


def run_config(spec: str | Path) -> dict:
    """The resolved config of what `spec` names, as far as sampling needs it: a run directory's config.yaml; for
    a model folder (local or on the Hub), its `rae` section pointing at the decoder, statistics and encoder
    inside the folder and its `objective.shift`; {} for anything else (a checkpoint folder, a file)."""
    folder = Path(resolve_weights(spec)) if hub_repo_id(str(spec)) and not Path(spec).exists() else Path(spec)
    if folder.is_dir() and is_model_folder(folder):
        config = read_model_folder(folder)
        rae = read_model_folder(config["rae"]) if config["kind"] != "rae" else config
        section = {"encoder": rae["encoder"], "decoder": rae["decoder"], "stats": rae.get("stats")}
        return {"stage": config.get("stage"), "rae": section, "objective": {"shift": config.get("shift")}}
    saved = RunDir(folder).saved_config() if folder.is_dir() else None
    return saved or {}


def command_line() -> list[str]:
    return [Path(sys.argv[0]).name, *sys.argv[1:]]
