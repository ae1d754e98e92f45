"""`mfrae export`: tiny digits runs -> model folders -> `mfrae sample --ckpt FOLDER` and the loaders.

The truth a folder is held to: sampling from it gives byte-identical images to sampling from the run it came
from (same seed), its weights equal the run's EMA weights tensor for tensor, and its model card's header is
the YAML the Hub reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mfrae.checkpoint import load_dit_dh, load_latent_stats, load_model, load_vit_decoder, read_safetensors
from mfrae.cli import main
from mfrae.train.runs import RunDir, resolve_weights

TINY = [
    "rae.encoder.options={hidden_size: 32, depth: 1, num_heads: 2}",
    "model.options={hidden_size: [32, 48], depth: [1, 1], num_heads: [2, 2]}",
    "train.global_batch=8", "train.log_every=1", "train.ckpt_every=2", "train.sample_count=4",
    "train.sample_steps=4", "optim.warmup_steps=0", "train.steps=2",
]
TINY_DECODER = ["model.options={hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}"]


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """decoder -> stats -> teacher -> mft (from the teacher), two steps each, through `mfrae` commands."""
    root = tmp_path_factory.mktemp("runs")
    runs = {name: root / name for name in ("decoder", "stats", "teacher", "mft")}
    assert main(["train", "decoder", "--config", "digits", "--out", str(runs["decoder"]),
                 *sets(*TINY, *TINY_DECODER, "objective.disc_start_step=1", "objective.gan_start_step=1")]) == 0
    assert main(["stats", "--config", "digits", "--out", str(runs["stats"]), *sets(TINY[0])]) == 0
    inputs = [f"rae.decoder={runs['decoder']}", f"rae.stats={runs['stats']}"]
    assert main(["train", "teacher", "--config", "digits", "--out", str(runs["teacher"]), *sets(*TINY, *inputs)]) == 0
    assert main(["train", "mft", "--config", "digits", "--out", str(runs["mft"]),
                 *sets(*TINY, *inputs, f"model.init={runs['teacher']}")]) == 0
    return runs


@pytest.fixture(scope="module")
def folders(runs, tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    out = {}
    for name in ("teacher", "mft", "decoder"):
        out[name] = root / name
        assert main(["export", "--ckpt", str(runs[name]), "--out", str(out[name]), "--repo-id", f"me/{name}"]) == 0
    return out


def card_header(folder: Path) -> dict:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.mark.parametrize("name,kind", [("teacher", "teacher"), ("mft", "meanflow"), ("decoder", "rae")])
def test_folder_holds_weights_config_card_and_grid(runs, folders, name, kind):
    folder = folders[name]
    config = json.loads((folder / "config.json").read_text())
    assert config["library"] == "mfrae" and config["kind"] == kind
    header = card_header(folder)
    assert header["library_name"] == "mfrae" and "mfrae" in header["tags"] and "image-generation" in header["tags"]
    assert header["license"] and header["datasets"] == ["sklearn-digits"]
    assert header["pipeline_tag"] == "unconditional-image-generation"
    assert Image.open(folder / "samples.png").size[0] > 0
    assert yaml.safe_load((folder / "training_config.yaml").read_text())["stage"] == name
    ema = RunDir(runs[name]).latest_checkpoint() / "ema.safetensors"
    exported = folder / ("decoder.safetensors" if kind == "rae" else "model.safetensors")
    ours, theirs = read_safetensors(exported), read_safetensors(ema)
    assert ours[1] == theirs[1]  # kind and config in the metadata
    assert ours[0].keys() == theirs[0].keys() and all(torch.equal(ours[0][k], theirs[0][k]) for k in ours[0])
    if kind != "rae":
        rae = json.loads((folder / "rae" / "config.json").read_text())
        assert rae["kind"] == "rae" and rae["encoder"]["name"] == "small_vit"
        assert "mfrae sample --ckpt me/" in (folder / "README.md").read_text()


def test_loaders_read_a_folder(runs, folders):
    student = load_dit_dh(folders["mft"])
    assert student.is_meanflow and not load_model(folders["teacher"]).is_meanflow
    assert resolve_weights(folders["mft"]) == str(folders["mft"])
    stats = load_latent_stats(folders["mft"])  # through its rae/ folder
    reference = load_latent_stats(resolve_weights(runs["stats"]))
    assert torch.equal(stats.mean, reference.mean)
    decoder = load_vit_decoder(folders["decoder"])
    assert decoder.config == load_vit_decoder(folders["mft"]).config
    with pytest.raises(Exception, match="holds no"):
        load_dit_dh(folders["decoder"])


@pytest.mark.parametrize("name,steps", [("mft", 1), ("mft", 2), ("teacher", 3)])
def test_sampling_a_folder_matches_sampling_the_run(runs, folders, tmp_path, name, steps):
    outs = {}
    for source, ckpt in (("run", runs[name]), ("folder", folders[name])):
        outs[source] = tmp_path / source
        assert main(["sample", "--ckpt", str(ckpt), "--steps", str(steps), "--num", "6", "--seed", "3",
                     "--no-png", "--out", str(outs[source])]) == 0
    with np.load(outs["run"] / "samples.npz") as a, np.load(outs["folder"] / "samples.npz") as b:
        assert a["arr_0"].std() > 0
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


def test_a_folder_moved_elsewhere_still_samples(folders, tmp_path):
    moved = tmp_path / "moved"
    import shutil

    shutil.copytree(folders["mft"], moved)
    assert main(["sample", "--ckpt", str(moved), "--num", "2", "--no-png", "--out", str(tmp_path / "s")]) == 0


def test_an_unreachable_hub_id_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["sample", "--ckpt", "nobody-here/no-such-model", "--out", str(tmp_path / "s")]) != 0
    err = capsys.readouterr().err.strip()
    assert "nobody-here/no-such-model" in err and "Hub model folder" in err and len(err.splitlines()) == 1


def test_export_refuses_a_non_empty_out_and_a_bare_file(runs, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert main(["export", "--ckpt", str(runs["mft"]), "--out", str(tmp_path / "busy")]) != 0
    assert "not an empty folder" in capsys.readouterr().err
    ema = resolve_weights(runs["mft"])
    assert main(["export", "--ckpt", ema, "--out", str(tmp_path / "new")]) != 0
    assert "bare weights file" in capsys.readouterr().err
