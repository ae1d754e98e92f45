"""`mfrae sample` stopped part-way: by a signal, by a full or read-only disk; and refusals that write nothing.

Checked against an uninterrupted run of the same settings: after the stop, the printed `--resume` command, run
as printed once the cause is gone, must give byte-identical files; nothing half-written may be left under a
final name or counted as done. A full disk is simulated by writers that write part of a file and then fail with
ENOSPC, as a real full disk does (root ignores read-only folders, and tmpfs mounts are not available)."""

from __future__ import annotations

import errno
import hashlib
import os
import shlex
import signal
from pathlib import Path

import pytest
from PIL import Image

from conftest import save_tiny_sampling_models
from mfrae import sample_shards
from mfrae.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

NUM, SHARD, BATCH = 20, 6, 3  # 4 shards, the last one short


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_sampling_models(tmp_path_factory.mktemp("tiny"))


def argv(models, out: Path, *extra: str) -> list[str]:
    return ["sample", "--ckpt", str(models["student"]), "--decoder", str(models["decoder"]), "--num-samples",
            str(NUM), "--shard-size", str(SHARD), "--batch-size", str(BATCH), "--device", "cpu", "--steps", "2",
            "--out", str(out), *extra]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files(root: Path) -> dict[str, str]:
    """Every file under root (hidden ones included) -> its digest; sampling.json differs by its timings."""
    return {str(p.relative_to(root)): digest(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "sampling.json"}


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "samples"
    assert main(argv(models, out)) == 0
    return out


def error_line(capsys, prefix: str = "mfrae sample:") -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and "Traceback" not in err and "usage:" not in err, err
    return lines[0]


def run_printed(line: str) -> int:
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[0] == "mfrae" and command[-1] == "--resume"
    return main(command[1:])


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what a write() on a full disk raises: no file name


def test_a_full_disk_while_writing_a_shard_stops_in_one_line_and_resumes(models, reference, tmp_path, monkeypatch,
                                                                          capsys):
    out = tmp_path / "full"
    real = sample_shards._write_pieces

    def filling(tmp, path, num, first, pieces):
        if path.name == "shard_000002.npz":
            tmp.write_bytes(b"PK\x03\x04 the first bytes of a zip")
            raise enospc()
        return real(tmp, path, num, first, pieces)

    monkeypatch.setattr(sample_shards, "_write_pieces", filling)
    command = ["mfrae", *argv(models, out)]
    monkeypatch.setattr("sys.argv", command)
    assert main(command[1:]) == 2
    line = error_line(capsys)
    assert f"cannot write {out / 'shards' / 'shard_000002.npz'}: No space left on device [ENOSPC]" in line
    assert f"12 of {NUM} images in complete shards kept" in line
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard_000000.npz", "shard_000001.npz"]
    assert not (out / "samples.npz").exists()
    monkeypatch.undo()
    monkeypatch.setattr("sys.argv", command)
    assert run_printed(line) == 0
    assert files(out) == files(reference)


def test_a_full_disk_while_writing_a_png_leaves_no_half_png(models, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "png"
    real, calls = Image.Image.save, []

    def filling(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 8:
            Path(fp).write_bytes(b"\x89PNG half")
            raise enospc()
        return real(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", filling)
    assert main(argv(models, out)) == 2
    line = error_line(capsys)
    assert f"cannot write {out / 'images' / '000007.png'}: No space left on device [ENOSPC]" in line
    assert not (out / "images" / "000007.png").exists() and not list(out.rglob(".*.partial"))
    assert [p.name for p in (out / "shards").iterdir()] == ["shard_000000.npz"]
    monkeypatch.undo()
    assert main([*argv(models, out), "--resume"]) == 0
    assert files(out) == files(reference)


def test_a_full_disk_while_assembling_keeps_every_shard(models, reference, tmp_path, monkeypatch, capsys):
    out = tmp_path / "assemble"
    real = sample_shards._write_pieces

    def filling(tmp, path, num, first, pieces):
        if path.name == "samples.npz":
            raise enospc()
        return real(tmp, path, num, first, pieces)

    monkeypatch.setattr(sample_shards, "_write_pieces", filling)
    assert main(argv(models, out)) == 2
    assert f"cannot write {out / 'samples.npz'}" in error_line(capsys)
    assert len(list((out / "shards").glob("shard_*.npz"))) == 4 and not (out / "samples.npz").exists()
    monkeypatch.undo()
    assert main([*argv(models, out), "--resume"]) == 0
    assert files(out) == files(reference)


def test_a_signal_stops_between_batches_and_the_printed_command_resumes(models, reference, tmp_path, monkeypatch,
                                                                        capsys):
    import mfrae.sample

    out = tmp_path / "stopped"
    real, calls = mfrae.sample.generate_batch, []

    def interrupted(*args, **kwargs):  # Ctrl-C arrives while the 4th batch (the last of shard 1) is being made
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(mfrae.sample, "generate_batch", interrupted)
    assert main(argv(models, out)) == 130
    line = error_line(capsys)
    assert line.startswith("mfrae sample: stopped by SIGINT, 12 of 20 images in complete shards kept; resume with:")
    assert len(calls) == 4  # the batch in flight was finished, no other one started
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard_000000.npz", "shard_000001.npz"]
    monkeypatch.undo()
    assert run_printed(line) == 0
    assert files(out) == files(reference)


#################################################################################
#                 Refusals: one line, the right culprit, nothing written           #
#################################################################################


@pytest.mark.parametrize("grid", ["1,nan,0", "1,inf,0", "abc", "0,1", "1"])
def test_a_bad_grid_is_refused_in_one_line_before_anything_is_written(models, tmp_path, capsys, grid):
    out = tmp_path / "grid"
    argv_ = argv(models, out)
    argv_.remove("--steps"), argv_.remove("2")
    assert main([*argv_, "--grid", grid]) == 2
    assert f"--grid: expected at least 2 strictly decreasing times in [0, 1], got {grid!r}" in error_line(capsys)
    assert not out.exists()


def test_a_missing_ckpt_is_named_not_the_decoder(tmp_path, capsys):
    assert main(["sample", "--ckpt", "/nonexistent", "--out", str(tmp_path / "s")]) == 2
    line = error_line(capsys)
    assert "/nonexistent" in line and "decoder" not in line
    assert not (tmp_path / "s").exists()
