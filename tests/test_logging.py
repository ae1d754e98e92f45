"""Training loggers: TensorBoard event files and an offline Weights & Biases run, read back with each
library's own reader; a logger that cannot be imported is refused at the start, before any run file exists."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mfrae.cli import main

TINY = [
    "rae.encoder.options={hidden_size: 32, depth: 1, num_heads: 2}",
    "model.options={hidden_size: [32, 48], depth: [1, 1], num_heads: [2, 2]}",
    "train.global_batch=8", "train.log_every=1", "train.ckpt_every=2", "train.sample_count=4",
    "train.sample_steps=2", "optim.warmup_steps=0", "train.steps=2", "train.sample_every=1",
]


@pytest.fixture(scope="module")
def rae(tmp_path_factory):
    """A tiny decoder run and latent statistics: previews need both."""
    root = tmp_path_factory.mktemp("rae")
    decoder = [*TINY[:1], "model.options={hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}",
               *TINY[2:-1], "train.steps=1", "objective.disc_start_step=5", "objective.gan_start_step=5"]
    assert main(["train", "decoder", "--config", "digits", "--out", str(root / "decoder"),
                 *[arg for item in decoder for arg in ("--set", item)]]) == 0
    assert main(["stats", "--config", "digits", "--out", str(root / "stats"), "--set", TINY[0]]) == 0
    return [f"rae.stats={root / 'stats'}", f"rae.decoder={root / 'decoder'}"]


def train(out: Path, rae: list[str], *extra: str) -> int:
    items = [*TINY, *rae, *extra]
    return main(["train", "teacher", "--config", "digits", "--out", str(out),
                 *[arg for item in items for arg in ("--set", item)]])


def test_tensorboard_gets_every_logged_scalar_and_the_preview_grids(tmp_path, rae):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert train(run, rae, "train.tensorboard=true") == 0
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    loss = events.Scalars("teacher/loss")
    assert [e.step for e in loss] == [r["step"] for r in records]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert {"teacher/grad_norm", "teacher/lr"} <= set(events.Tags()["scalars"])
    images = events.Images("teacher/samples")
    assert [e.step for e in images] == [1, 2]  # sample_every=1
    assert images[0].width > 32 and images[0].height > 32  # a grid of 4 previews, not one image


def test_wandb_offline_run_holds_the_logged_keys(tmp_path, rae, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    run = tmp_path / "run"
    assert train(run, rae, "train.wandb={project: mfrae-test, mode: offline}") == 0
    found = sorted((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(found) == 1 and found[0].name.endswith("mfrae-" + found[0].name.rsplit("-mfrae-", 1)[1])
    records = (found[0] / f"run-{found[0].name.split('-', 3)[-1]}.wandb").read_bytes()  # W&B's protobuf log
    assert all(key.encode() in records for key in ("teacher/loss", "teacher/grad_norm", "teacher/lr"))
    grids = sorted(p.name.split("_")[1] for p in (found[0] / "files/media/images/teacher").glob("samples_*.png"))
    assert grids == ["1", "2"]  # the preview grid of each step, as W&B images


def test_a_logger_that_cannot_be_imported_is_refused_at_start(tmp_path, rae, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what Python does for a module it cannot import
    run = tmp_path / "run"
    assert train(run, rae, "train.wandb={project: x, mode: offline}") != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.wandb" in err[0] and "mfrae[wandb]" in err[0]
    assert not (run / "config.yaml").exists()  # refused before the run started
