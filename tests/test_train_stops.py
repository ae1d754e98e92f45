"""Stopping and resuming training: a SIGINT / SIGTERM finishes the step, writes its checkpoint, prints the exact
`--resume` command and exits 130 / 143 (every torchrun process on the same step); a second signal quits at once;
`--resume` skips broken newest checkpoints, naming them, and refuses in one line only when none is usable.

Checked against the run directory itself: the checkpoint named is the step the metrics log ends at, `latest`
names it, and the printed command, run as printed, continues from it."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mfrae import interrupts
from mfrae.cli import main

TINY = ["rae.encoder.options={hidden_size: 32, depth: 1, num_heads: 2}",
        "model.options={hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}",
        "objective.discriminator=none", "train.global_batch=8", "train.log_every=1", "data.num_workers=0",
        "train.tensorboard=false", "train.sample_count=4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def command(out: Path, *extra: str) -> list[str]:
    """A decoder run that would take hours unless stopped (checkpoints only when asked)."""
    return ["mfrae", "train", "decoder", "--config", "digits", "--out", str(out),
            *sets(*TINY, "train.steps=1000000", "train.ckpt_every=1000000", *extra)]


def launch(argv: list[str], cwd: Path) -> subprocess.Popen:
    """argv as a user types it: `mfrae ...` or `torchrun ... -m mfrae ...`, run with this interpreter."""
    if argv[0] == "mfrae":
        argv = [sys.executable, "-m", "mfrae", *argv[1:]]
    elif argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", *argv[1:]]
    return subprocess.Popen(argv, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not logged_steps(run) or logged_steps(run)[-1] < step:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run did not reach its step in time"
        time.sleep(0.2)


def stop_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("mfrae train: stopped by")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def latest(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def saved_step(ckpt: Path) -> int:
    return int(torch.load(ckpt / "state.pt", weights_only=True)["step"])


def test_a_signal_finishes_the_step_checkpoints_it_and_prints_the_resume_command(tmp_path):
    """Ctrl-C (SIGINT, 130) stops a run; its printed command resumes it; SIGTERM (143) stops that one."""
    run = tmp_path / "run"
    proc = launch(command(run), tmp_path)
    wait_for_step(proc, run, 3)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 130, stderr[-3000:]
    line = stop_line(stderr)
    assert "Traceback" not in stderr
    steps = logged_steps(run)
    ckpt = latest(run)
    assert saved_step(ckpt) == steps[-1] and f"after step {steps[-1]}," in line and str(ckpt) in line
    again = shlex.split(line.split("resume with: ", 1)[1])
    assert again == [*command(run), "--resume"]
    # The printed command, as printed, continues the run from that step.
    proc = launch(again, tmp_path)
    wait_for_step(proc, run, steps[-1] + 2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 143, stderr[-3000:]
    assert f"resumed {ckpt} at step {steps[-1]}" in stderr
    assert saved_step(latest(run)) == logged_steps(run)[-1] > steps[-1]


def test_a_second_signal_quits_at_once(monkeypatch):
    quits = []
    before = signal.getsignal(signal.SIGINT)  # the default handler, or SIG_IGN in a background job
    monkeypatch.setattr(interrupts.os, "_exit", quits.append)
    clock = iter([100.0, 100.5, 103.0])  # first signal, its launcher's copy, a second press
    monkeypatch.setattr(interrupts.time, "monotonic", lambda: next(clock))
    with interrupts.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT and not quits
        os.kill(os.getpid(), signal.SIGINT)  # within the grace: the same request
        assert not quits
        os.kill(os.getpid(), signal.SIGINT)
        assert quits == [130]
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_resume_commands_drop_overwrite_and_keep_torchrun():
    base = ["mfrae", "sample", "--ckpt", "a b", "--overwrite", "--out", "x"]
    assert interrupts.resume_command(base) == "mfrae sample --ckpt 'a b' --out x --resume"
    assert interrupts.resume_command(base, 8, 4) == \
        "torchrun --nnodes 2 --nproc_per_node 4 -m mfrae sample --ckpt 'a b' --out x --resume"


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


@pytest.mark.slow  # 30 s on 2 idle cores: two gloo processes under the real torchrun, twice
def test_under_torchrun_a_signal_to_one_process_stops_every_process_at_the_same_step(tmp_path):
    run = tmp_path / "run"
    argv = ["torchrun", "--nproc_per_node", "2", "-m", *command(run)]
    proc = launch(argv, tmp_path)
    wait_for_step(proc, run, 3)
    workers = _children(proc.pid)
    assert len(workers) == 2
    os.kill(max(workers), signal.SIGTERM)  # one process only: the other must agree on the step
    _, stderr = proc.communicate(timeout=600)
    line = stop_line(stderr)
    ckpt = latest(run)
    steps = logged_steps(run)
    assert saved_step(ckpt) == steps[-1] and str(ckpt) in line
    again = shlex.split(line.split("resume with: ", 1)[1])
    assert again == ["torchrun", "--nproc_per_node", "2", "-m", *command(run), "--resume"]
    proc = launch(again, tmp_path)
    wait_for_step(proc, run, steps[-1] + 2)
    os.kill(min(_children(proc.pid)), signal.SIGINT)
    _, stderr = proc.communicate(timeout=600)
    stop_line(stderr)
    assert saved_step(latest(run)) == logged_steps(run)[-1] > steps[-1]


#################################################################################
#                     --resume past broken newest checkpoints                    #
#################################################################################


@pytest.fixture
def three_checkpoints(tmp_path) -> Path:
    run = tmp_path / "run"
    extra = sets(*TINY, "train.steps=6", "train.ckpt_every=2", "train.keep_last=3")
    assert main(["train", "decoder", "--config", "digits", "--out", str(run), *extra]) == 0
    assert [p.name for p in sorted((run / "checkpoints").glob("step_*"))] == \
        ["step_00000002", "step_00000004", "step_00000006"]
    return run


def _resume(run: Path, steps: int, capsys, caplog) -> tuple[int, str]:
    """The exit status, and what the command printed and logged."""
    extra = sets(*TINY, f"train.steps={steps}", "train.ckpt_every=2", "train.keep_last=3")
    with caplog.at_level("INFO", logger="mfrae"):
        code = main(["train", "decoder", "--config", "digits", "--out", str(run), "--resume", *extra])
    return code, capsys.readouterr().err + "\n" + caplog.text


def test_resume_skips_a_corrupt_newest_checkpoint_and_names_it(three_checkpoints, capsys, caplog):
    run = three_checkpoints
    ckpts = run / "checkpoints"
    (ckpts / "step_00000006" / "model.safetensors").write_bytes(b"not a safetensors file")
    state = ckpts / "step_00000004" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    code, err = _resume(run, 8, capsys, caplog)
    assert code == 0, err
    skipped = {line.split("--resume: ", 1)[1] for line in err.splitlines() if "--resume: skipped" in line}
    assert len(skipped) == 1, err
    skipped = list(skipped)
    assert "step_00000006" in skipped[0] and "model.safetensors" in skipped[0]
    assert "step_00000004" in skipped[0] and "state.pt" in skipped[0]
    assert f"resumed {ckpts / 'step_00000002'} at step 2" in err
    assert logged_steps(run)[-1] == 8 and saved_step(latest(run)) == 8


def test_resume_refuses_in_one_line_when_no_checkpoint_is_usable(three_checkpoints, capsys, caplog):
    ckpts = three_checkpoints / "checkpoints"
    for ckpt in ckpts.glob("step_*"):
        (ckpt / "ema.safetensors").write_bytes(b"")
    code, err = _resume(three_checkpoints, 8, capsys, caplog)
    lines = [line for line in err.splitlines() if line.startswith("mfrae train: error:")]
    assert code == 2 and len(lines) == 1, err
    assert all(f"step_0000000{k}" in lines[0] for k in (2, 4, 6)) and "ema.safetensors" in lines[0]
    assert logged_steps(three_checkpoints)[-1] == 6  # nothing was trained or logged
