"""Run directories: one process at a time, clear refusals, checked resumes, failed writes that lose nothing,
and checkpoints that never hold weights the divergence check has not seen.

Training runs are tiny teacher runs on the digits (a few seconds each). Faults are injected by hand: a NaN
loss or weight at a chosen step, a writer that fails like a full disk, hand-edited metrics and config files,
a second process holding the lock.
"""

from __future__ import annotations

import errno
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mfrae.checkpoint import load_model, save_model
from mfrae.cli import main
from mfrae.errors import CheckpointError
from mfrae.train import engine, stages
from mfrae.train.config import LoopConfig
from mfrae.train.runs import RunDir

ENCODER = "rae.encoder.options={hidden_size: 32, depth: 1, num_heads: 2}"
NETWORK = "model.options={hidden_size: [32, 48], depth: [1, 1], num_heads: [2, 2]}"
TINY = [ENCODER, NETWORK, "train.global_batch=8", "train.log_every=1", "train.ckpt_every=2", "train.sample_count=4",
        "train.sample_steps=4", "optim.warmup_steps=0", "rae.decoder=null", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def stats(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stats") / "stats"
    assert main(["stats", "--config", "digits", "--out", str(out), "--set", ENCODER]) == 0
    return out


def train(stats: Path, out: Path, *overrides: str, resume: bool = False) -> int:
    """`mfrae train teacher` at tiny size into `out`; the exit code."""
    argv = ["train", "teacher", "--config", "digits", "--out", str(out)]
    for item in (*TINY, f"rae.stats={stats}", *overrides):
        argv += ["--set", item]
    return main([*argv, *(["--resume"] if resume else [])])


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def run_files(run: Path) -> tuple[bytes, ...]:
    return tuple((run / name).read_bytes() for name in ("config.yaml", "run.json", "metrics.jsonl"))


def checkpoint_names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def all_finite(folder: Path) -> bool:
    return all(torch.isfinite(t).all() for name in ("model", "ema")
               for t in load_model(folder / f"{name}.safetensors").state_dict().values())


def error_line(err: str) -> str:
    """The command's error, checked to be its last output and one line (progress bars may come before it)."""
    tail = err[err.index("mfrae train:"):].strip()
    assert "\n" not in tail, tail
    return tail


def poison(monkeypatch, action) -> None:
    """Train with the stage's real objective followed by `action(net, loss, step)` (0-based step)."""
    real_build = stages.build_stage

    def build(cfg, info):
        parts = real_build(cfg, info)
        objective = parts.objective

        def poisoned(net, x, y, step, *rest):
            return action(net, objective(net, x, y, step, *rest), step)

        parts.objective = poisoned
        return parts

    monkeypatch.setattr(stages, "build_stage", build)


#################################################################################
#                 Divergence: no checkpoint without a check                     #
#################################################################################


def test_the_check_cadence_covers_every_logged_and_checkpointed_step_and_the_last():
    loop = LoopConfig(steps=10, log_every=3, ckpt_every=4)
    assert [s for s in range(1, 11) if engine.divergence_check_due(s, loop, every_step=False)] == [3, 4, 6, 8, 9, 10]
    assert all(engine.divergence_check_due(s, loop, every_step=True) for s in range(1, 11))


def test_a_nan_at_the_last_step_under_the_gpu_cadence_becomes_no_checkpoint(stats, tmp_path, monkeypatch, capsys):
    """5 steps, logs and checkpoints every 2: step 5 is neither, so before the fix it went unchecked."""
    monkeypatch.setattr(engine, "EVERY_STEP_CHECK_DEVICES", frozenset())  # the CUDA cadence, on the CPU
    poison(monkeypatch, lambda net, loss, step: loss * math.nan if step == 4 else loss)
    run = tmp_path / "run"
    assert train(stats, run, "train.steps=5", "train.log_every=2") == 3
    assert "diverged by step 5" in capsys.readouterr().err
    assert checkpoint_names(run) == ["latest", "step_00000002", "step_00000004"]
    assert (run / "checkpoints" / "latest").read_text() == "step_00000004"
    assert all_finite(run / "checkpoints" / "step_00000004")


@pytest.mark.parametrize("fault", ["nan_weight_at_step_4", "lr_1e6"])
def test_the_divergence_message_names_a_checkpoint_with_checked_weights(stats, tmp_path, monkeypatch, capsys, fault):
    run = tmp_path / "run"
    if fault == "nan_weight_at_step_4":
        # Step 4's loss and gradient are finite, but a bias (whose value its gradient does not use) turns NaN
        # after the forward pass: only the weight check can stop checkpoint 4 from holding it.
        def corrupt(net, loss, step):
            if step == 3:
                bias = next(m.bias for m in net.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None)
                bias.data.fill_(math.nan)
            return loss

        poison(monkeypatch, corrupt)
        assert train(stats, run, "train.steps=6") == 3
    else:
        assert train(stats, run, "train.steps=6", "optim.lr=1e6", "train.ckpt_every=1") == 3
    err = capsys.readouterr().err
    assert "training diverged" in err
    written = [p for p in (run / "checkpoints").glob("step_*")]
    for folder in written:  # every checkpoint written passed the check
        assert all_finite(folder), folder
    named = [p for p in written if str(p) in err]
    if named:
        assert named == [RunDir(run).latest_checkpoint()] and "weights were checked finite" in err
    else:
        assert "no checkpoint was written yet" in err
    if fault == "nan_weight_at_step_4":
        assert named == [run / "checkpoints" / "step_00000002"]


def test_a_checkpoint_with_nan_weights_is_not_resumed(stats, tmp_path, capsys):
    run = tmp_path / "run"
    assert train(stats, run, "train.steps=2") == 0
    ckpt = RunDir(run).latest_checkpoint()
    model = load_model(ckpt / "model.safetensors")  # as written by an mfrae that did not check weights
    next(model.parameters()).data.fill_(math.nan)
    save_model(model, ckpt / "model.safetensors")
    before = run_files(run)
    assert train(stats, run, "train.steps=4", resume=True) == 2
    err = capsys.readouterr().err
    assert f"{ckpt.name} (holds NaN / Inf weights)" in err and "no checkpoint" in err
    assert run_files(run) == before


#################################################################################
#                        One process per run directory                          #
#################################################################################


def test_a_run_directory_in_use_is_refused_naming_its_holder(stats, tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from mfrae.train.runs import RunDir; RunDir(sys.argv[1]).lock(); "
         "print('locked', flush=True); sys.stdin.read()", str(run)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"  # it holds the lock from here until its stdin closes
        assert train(stats, run, "train.steps=2") == 2
        err = capsys.readouterr().err
        assert f"is in use by another run (pid {holder.pid} on host {platform.node()})" in err
        assert sorted(p.name for p in run.iterdir()) == ["run.lock"]  # nothing else was written
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # the lock died with its holder; the lock file alone does not make the directory "not empty"
    assert train(stats, run, "train.steps=2") == 0


def test_only_temporary_folders_no_live_process_writes_are_removed(tmp_path):
    run = RunDir(tmp_path / "run")
    (run.checkpoints / "step_00000002").mkdir(parents=True)
    (run.checkpoints / "step_00000002" / "state.pt").write_bytes(b"")
    (run.checkpoints / "latest").write_text("step_00000002")
    dead = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # above every pid: never a live process
    live, host = os.getppid(), platform.node()
    folders = {
        f".step_00000004.tmp-{dead}@{host}": False,  # a dead process of this host: removed
        f".step_00000004.tmp-{dead}": False,  # the same, named by an older mfrae
        f".step_00000006.tmp-{os.getpid()}@{host}": False,  # this process's own leftover: removed
        f".step_00000004.tmp-{live}@{host}": True,  # a live process: kept
        f".step_00000004.tmp-{dead}@another-host": True,  # cannot be checked from here: kept
    }
    for name in folders:
        (run.checkpoints / name).mkdir()
        (run.checkpoints / name / "model.safetensors").write_bytes(b"partial")
    (run.root / f".config.yaml.{dead}.partial").write_text("x")
    (run.root / f".run.json.{live}.partial").write_text("x")

    assert run.claim(resume=True) == run.checkpoints / "step_00000002"
    run.unlock()
    expect = {name for name, kept in folders.items() if kept}
    assert {p.name for p in run.checkpoints.glob(".step_*")} == expect
    assert [p.name for p in run.root.glob(".*.partial")] == [f".run.json.{live}.partial"]
    # ... and the same after each checkpoint written
    (run.checkpoints / f".step_00000004.tmp-{dead}@{host}").mkdir()
    run.save_checkpoint(8, {"state.pt": lambda p: p.write_bytes(b"")}, keep_last=2)
    assert {p.name for p in run.checkpoints.glob(".step_*")} == expect


#################################################################################
#                    Which directories a run may start in                       #
#################################################################################


@pytest.mark.parametrize("kind", ["foreign_folder", "crashed_before_its_first_checkpoint"])
def test_a_new_run_needs_a_new_or_empty_directory(stats, tmp_path, capsys, kind):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("not: ours\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    if kind == "crashed_before_its_first_checkpoint":
        (run / "run.json").write_text('{"launches": []}')
        (run / "checkpoints").mkdir()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert train(stats, run, "train.steps=2") == 2
    err = capsys.readouterr().err
    assert f"{run} is not empty (" in err and "config.yaml" in err and "metrics.jsonl" in err
    assert train(stats, run, "train.steps=2", resume=True) == 2
    assert f"--resume: {run} holds no complete checkpoint" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "run.lock"} == before


def test_resume_needs_an_existing_directory_with_a_checkpoint(stats, tmp_path, capsys):
    assert train(stats, tmp_path / "mistyped", "train.steps=2", resume=True) == 2
    assert f"--resume: {tmp_path / 'mistyped'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "mistyped").exists()
    (tmp_path / "empty").mkdir()
    assert train(stats, tmp_path / "empty", "train.steps=2", resume=True) == 2
    assert "holds no complete checkpoint, nothing to resume" in capsys.readouterr().err


#################################################################################
#                         Resume: check first, write after                      #
#################################################################################


def test_resume_refuses_a_changed_network_and_reports_other_changes(stats, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    assert train(stats, run, "train.steps=2") == 0
    before = run_files(run)
    deeper = NETWORK.replace("depth: [1, 1]", "depth: [2, 1]")
    assert train(stats, run, "train.steps=4", deeper, resume=True) == 2
    assert "model.options.depth: [1, 1] -> [2, 1]" in error_line(capsys.readouterr().err)
    assert run_files(run) == before

    lr = yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"]
    assert train(stats, run, "train.steps=3", f"optim.lr={2 * lr}", resume=True) == 0
    assert f"optim.lr: {lr} -> {2 * lr}; train.steps: 2 -> 3" in caplog.text
    launch = json.loads((run / "run.json").read_text())["launches"][-1]
    assert launch["resumed_at"] == 2 and launch["changed"] == {"optim.lr": [lr, 2 * lr], "train.steps": [2, 3]}
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 2 * lr


def test_resume_drops_a_torn_last_metrics_line_and_refuses_a_corrupt_one(stats, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    assert train(stats, run, "train.steps=3") == 0  # checkpoints 2 and 3, metrics of steps 1 to 3
    (run / "checkpoints" / "latest").write_text("step_00000002")  # as if step 3's checkpoint never completed
    lines = (run / "metrics.jsonl").read_text().splitlines()

    corrupt = [lines[0], lines[1][:-1] + ' "x" 1}', lines[2]]
    (run / "metrics.jsonl").write_text("\n".join(corrupt) + "\n")
    before = run_files(run)
    assert train(stats, run, "train.steps=3", resume=True) == 2
    assert f"{run / 'metrics.jsonl'}:2: corrupt record" in capsys.readouterr().err
    assert run_files(run) == before

    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n" + lines[2][: len(lines[2]) // 2])  # torn mid-write
    assert train(stats, run, "train.steps=3", resume=True) == 0
    assert "metrics.jsonl:4: dropped an incomplete last record" in caplog.text
    assert steps_logged(run) == [1, 2, 3]  # step 3 once: the old record past the checkpoint was dropped too


#################################################################################
#                     Failed writes lose nothing, in one line                   #
#################################################################################


def _enospc(path):
    Path(path).write_bytes(b"half a file")
    raise OSError(errno.ENOSPC, "No space left on device")


def _torch_full_disk(obj, path):
    Path(path).write_bytes(b"PK half a zip")
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


@pytest.mark.parametrize("failure", ["safetensors_enospc", "torch_save_enforce_fail", "read_only_checkpoints"])
def test_a_failed_checkpoint_write_keeps_the_previous_one_latest(stats, tmp_path, monkeypatch, capsys, failure):
    run = tmp_path / "run"
    assert train(stats, run, "train.steps=2") == 0
    if failure == "safetensors_enospc":
        monkeypatch.setattr(engine, "save_model", lambda model, path: _enospc(path))
        cause = "No space left on device [ENOSPC]"
    elif failure == "torch_save_enforce_fail":
        monkeypatch.setattr(torch, "save", _torch_full_disk)
        cause = "enforce fail at inline_container.cc:672"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (run / "checkpoints").chmod(0o555)
        cause = "Permission denied [EACCES]"
    try:
        assert train(stats, run, "train.steps=4", resume=True) == 2
    finally:
        (run / "checkpoints").chmod(0o755)
    err = error_line(capsys.readouterr().err)
    assert cause in err
    assert f"{run / 'checkpoints' / 'step_00000004'}: cannot write the checkpoint of step 4" in err
    assert f"the previous checkpoint {run / 'checkpoints' / 'step_00000002'} is still latest" in err
    assert checkpoint_names(run) == ["latest", "step_00000002"]  # no temporary folder left behind
    assert RunDir(run).latest_checkpoint() == run / "checkpoints" / "step_00000002"


def test_run_files_are_never_written_through_symbolic_links(stats, tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "shared.yaml"
    assert train(stats, run, "train.steps=2") == 0
    (run / "config.yaml").rename(elsewhere)  # e.g. a config kept elsewhere and linked into the run
    (run / "config.yaml").symlink_to(elsewhere)
    shared = elsewhere.read_bytes()
    assert train(stats, run, "train.steps=3", resume=True) == 0
    assert elsewhere.read_bytes() == shared  # the link was replaced, its target left alone
    assert not (run / "config.yaml").is_symlink()
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 3

    elsewhere.write_text("someone else's file\n")

    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(elsewhere)
    with pytest.raises(CheckpointError, match="metrics.jsonl: cannot append .a symbolic link"):
        RunDir(run).log_metrics({"step": 4})
    assert elsewhere.read_text() == "someone else's file\n"
