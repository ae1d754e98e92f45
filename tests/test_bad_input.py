"""Bad input is refused with one line naming the file, key or value, and nothing already written is lost.

Every bad input here is built by hand (a pickle that would run a command, a misspelt preset section, out-of-range
numbers, statistics of another encoder, a file of the wrong kind, a cache index pointing outside the cache), so
each test fails on the behaviour it guards against, not on a captured message.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from mfrae.checkpoint import (
    load_dit_dh,
    load_latent_stats,
    load_model,
    load_torch_file,
    load_vit_decoder,
    save_latent_stats,
    save_model,
    write_safetensors,
)
from mfrae.cli import main
from mfrae.config import coerce
from mfrae.data.common import DataError
from mfrae.data.latents import LatentDataset, build_latent_cache
from mfrae.errors import CheckpointError, ConfigError
from mfrae.models.dit_dh import DiTDH, DiTDHConfig
from mfrae.models.rae import RAE, LatentStats
from mfrae.models.small_encoder import SmallViTEncoder
from mfrae.models.vit_decoder import ViTDecoder, ViTDecoderConfig
from mfrae.pipeline import load_pipeline_config
from mfrae.stats import latent_statistics
from mfrae.train.config import load_train_config

DIT = DiTDHConfig(input_size=4, in_channels=8, hidden_size=(32, 48), depth=(1, 1), num_heads=(2, 2), num_classes=10)
DECODER = ViTDecoderConfig(encoder_hidden_size=8, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                           patch_size=2, num_patches=16)
TINY_ENCODER = "rae.encoder.options={hidden_size: 32, depth: 1, num_heads: 2}"


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


#################################################################################
#  1. A code-executing pickle is refused, naming the global, never advising weights_only=False
#################################################################################


class RunsCommand:
    """Unpickling this calls os.system(command): the classic malicious checkpoint."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class RunsEval:
    """Unpickling this calls eval(expression)."""

    def __init__(self, expression: str):
        self.expression = expression

    def __reduce__(self):
        return (eval, (self.expression,))


@pytest.mark.parametrize("kind", ["os.system", "eval"])
def test_a_code_executing_pickle_is_refused_naming_the_global(tmp_path, kind):
    marker = tmp_path / "pwned"
    payload = (RunsCommand(f"touch {marker}") if kind == "os.system"
               else RunsEval(f"__import__('pathlib').Path({str(marker)!r}).touch()"))
    path = tmp_path / "stage2_model.pt"
    torch.save({"ema": {"w": torch.zeros(1)}, "extra": payload}, path)  # protocol 2, as torch writes checkpoints
    before = path.read_bytes()
    for load in (load_torch_file, load_dit_dh, load_latent_stats):
        with pytest.raises(CheckpointError) as err:
            load(path)
        message = one_line(err)
        assert message.startswith(f"{path}: refused")
        assert "code-executing pickle" in message
        blocked = r"(posix|nt|os)\.system" if kind == "os.system" else r"(builtins\.)?eval\b"
        assert re.search(rf"global {blocked}", message), message
        assert "weights_only=False" not in message and "Re-running" not in message
    assert not marker.exists()  # the command never ran
    assert path.read_bytes() == before


def test_a_pickle_that_is_not_a_checkpoint_keeps_the_reason_without_the_advice(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(b"\x80\x02}q\x00garbage that is no pickle")
    with pytest.raises(CheckpointError) as err:
        load_torch_file(path)
    message = one_line(err)
    assert message.startswith(f"{path}: not a readable torch checkpoint") and "weights_only=False" not in message
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt: not a readable torch checkpoint"):
        load_torch_file(tmp_path / "empty.pt")


#################################################################################
#  2. Misspelt top-level preset sections are refused; `_` keys hold anchors
#################################################################################


@pytest.mark.parametrize("typo", ["comon", "stage", "Stages"])
def test_a_misspelt_top_level_section_is_refused_naming_it_and_the_file(tmp_path, typo):
    sections = {"common": "  train: {steps: 7}\n", "stages": "  teacher: {optim: {lr: 0.5}}\n"}
    misspelt = {"comon": "common", "stage": "stages", "Stages": "stages"}[typo]
    text = "".join(f"{typo if name == misspelt else name}:\n{body}" for name, body in sections.items())
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    for load in (lambda: load_train_config("teacher", str(path)), lambda: load_pipeline_config(str(path))):
        with pytest.raises(ConfigError) as err:
            load()
        message = one_line(err)
        assert str(path) in message and repr(typo) in message
        assert "common" in message and "stages" in message  # the known sections are listed


def test_a_one_stage_file_with_a_stage_mapping_is_refused(tmp_path):
    path = tmp_path / "one.yaml"
    path.write_text("stage:\n  teacher: {optim: {lr: 0.5}}\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: unknown top-level section 'stage'"):
        load_train_config("teacher", str(path))


def test_underscore_keys_hold_anchors_shared_between_stages(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text(
        "_net: &net {preset: null, options: {depth: [3, 1]}}\n"
        "_lr: &lr 0.25\n"
        "common: {train: {steps: 9}}\n"
        "stages:\n"
        "  teacher: {model: *net, optim: {lr: *lr}}\n"
        "  mft: {model: {<<: *net, init: somewhere}}\n"
    )
    teacher = load_train_config("teacher", str(path))
    assert teacher.model.options == {"depth": [3, 1]} and teacher.model.preset is None
    assert teacher.optim.lr == 0.25 and teacher.train.steps == 9
    assert load_train_config("mft", str(path)).model.init == "somewhere"
    for stage in ("decoder", "teacher", "cmt", "mfd", "mft"):  # the bundled presets follow the convention
        for preset in ("digits", "imagenet256-xl", "imagenet512-xl"):
            load_train_config(stage, preset)


#################################################################################
#  3. Numeric ranges of the config sections name the dotted key and the value
#################################################################################

OUT_OF_RANGE = [
    ("optim.lr=-1", "optim.lr", "-1.0"),
    ("optim.lr=0", "optim.lr", "0.0"),
    ("optim.lr=inf", "optim.lr", "inf"),
    ("optim.lr=nan", "optim.lr", "nan"),
    ("optim.final_lr=-1", "optim.final_lr", "-1.0"),
    ("optim.warmup_steps=-5", "optim.warmup_steps", "-5"),
    ("optim.decay_start=-1", "optim.decay_start", "-1"),
    ("optim.decay_end=-1", "optim.decay_end", "-1"),
    ("optim.eps=0", "optim.eps", "0.0"),
    ("optim.betas=[1.5, 0.9]", "optim.betas[0]", "1.5"),
    ("optim.betas=[0.9, -0.1]", "optim.betas[1]", "-0.1"),
    ("optim.betas=[0.9, 1.0]", "optim.betas[1]", "1.0"),
    ("optim.weight_decay=-1", "optim.weight_decay", "-1.0"),
    ("optim.grad_clip=-1", "optim.grad_clip", "-1.0"),
    ("data.num_workers=-1", "data.num_workers", "-1"),
    ("data.prefetch_factor=0", "data.prefetch_factor", "0"),
    ("rae.noise_tau=-0.5", "rae.noise_tau", "-0.5"),
    ("train.steps=0", "train.steps", "0"),
    ("train.global_batch=-8", "train.global_batch", "-8"),
    ("train.micro_batch=0", "train.micro_batch", "0"),
    ("train.ema_decay=1.0", "train.ema_decay", "1.0"),
    ("train.ema_decay=-0.1", "train.ema_decay", "-0.1"),
    ("train.seed=-1", "train.seed", "-1"),
    ("train.log_every=0", "train.log_every", "0"),
    ("train.ckpt_every=0", "train.ckpt_every", "0"),
    ("train.keep_last=0", "train.keep_last", "0"),
    ("train.sample_every=-1", "train.sample_every", "-1"),
    ("train.sample_count=0", "train.sample_count", "0"),
    ("train.sample_steps=-1", "train.sample_steps", "-1"),
    ("train.max_grad_norm=-1", "train.max_grad_norm", "-1.0"),
    ("train.max_grad_norm=0", "train.max_grad_norm", "0.0"),
    ("eval.every=-20", "eval.every", "-20"),
    ("eval.num_samples=1", "eval.num_samples", "1"),
    ("eval.batch_size=0", "eval.batch_size", "0"),
    ("eval.steps=[1, 0]", "eval.steps[1]", "0"),
    ("eval.teacher_steps=[-2]", "eval.teacher_steps[0]", "-2"),
    ("eval.seed=-3", "eval.seed", "-3"),
]


@pytest.mark.parametrize("override,key,value", OUT_OF_RANGE, ids=[row[0] for row in OUT_OF_RANGE])
def test_out_of_range_values_are_refused_naming_the_key_and_the_value(override, key, value):
    with pytest.raises(ConfigError) as err:
        load_train_config("teacher", "digits", [override])
    message = one_line(err)
    assert f"{key}: " in message and f"got {value}" in message, message


def test_limits_themselves_and_infinite_divergence_threshold_are_accepted():
    cfg = load_train_config("teacher", "digits", [
        "optim.final_lr=0", "optim.warmup_steps=0", "data.num_workers=0", "train.ema_decay=0",
        "optim.betas=[0, 0.999]", "train.max_grad_norm=.inf", "eval.num_samples=2", "rae.noise_tau=0",
    ])
    assert cfg.train.max_grad_norm == float("inf") and cfg.optim.betas == (0.0, 0.999)


def test_a_bad_value_fails_the_command_in_one_line_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "teacher", "--config", "digits", "--out", str(out), "--set", "optim.lr=nan"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "optim.lr: must be a finite number > 0, got nan" in err
    assert not out.exists()
    assert main(["stats", "--config", "digits", "--out", str(out), "--set", "data.num_workers=-2"]) == 2
    assert "data.num_workers: must be an integer >= 0, got -2" in capsys.readouterr().err
    assert not out.exists()


def test_a_multi_type_value_keeps_the_reason_of_every_type_tried():
    with pytest.raises(ConfigError) as err:
        coerce([1, "wide"], int | tuple[int, int], "model.options.hidden_size")
    message = one_line(err)
    assert message.startswith("model.options.hidden_size: [1, 'wide'] is not a valid int | tuple")
    assert "as int: expected an integer, got [1, 'wide']" in message
    assert "model.options.hidden_size[1]: expected an integer, got 'wide'" in message  # why the tuple failed


#################################################################################
#  4. Statistics carry their encoder; another encoder refuses them; `mfrae stats` never overwrites silently
#################################################################################


class Images(Dataset):
    """A few fixed random images with labels 0..n-1 (mod classes); `labels` may be given to plant bad ones."""

    def __init__(self, n: int = 6, num_classes: int = 3, labels: list[int] | None = None, size: int = 32):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, size, size, generator=generator)
        self.labels = labels if labels is not None else [i % num_classes for i in range(n)]
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


def _encoder(seed: int) -> SmallViTEncoder:
    return SmallViTEncoder(seed=seed, hidden_size=16, depth=1, num_heads=2)


def test_statistics_of_another_encoder_are_refused_and_the_authors_stat_pt_still_loads(tmp_path):
    mine, other = _encoder(0), _encoder(1)  # same architecture and latent shape, other weights
    assert mine.fingerprint() != other.fingerprint()
    path = save_latent_stats(latent_statistics(mine, Images(), batch_size=4), tmp_path / "stats.safetensors")
    with safe_open(str(path), framework="pt") as f:  # the file itself names its encoder
        assert json.loads(f.metadata()["mfrae.config"])["encoder"] == {"name": "small_vit", "fingerprint": mine.fingerprint()}
    stats = load_latent_stats(path)
    assert RAE(mine, None, stats).stats is stats
    with pytest.raises(CheckpointError) as err:
        RAE(other, None, load_latent_stats(path))
    message = one_line(err)
    assert message.startswith(f"{path}: computed with encoder 'small_vit'")
    assert mine.fingerprint() in message and other.fingerprint() in message
    # The authors' stat.pt names no encoder: loaded as it is, with any encoder of the right shape.
    torch.save({"mean": stats.mean, "var": stats.var}, tmp_path / "stat.pt")
    official = load_latent_stats(tmp_path / "stat.pt")
    assert official.encoder_fingerprint is None and RAE(other, None, official).stats is official


def test_garbled_statistics_metadata_is_refused(tmp_path):
    path = write_safetensors({"mean": torch.zeros(16, 4, 4), "var": torch.ones(16, 4, 4)}, tmp_path / "s.safetensors",
                             "latent_stats", {"encoder": "small_vit"})
    with pytest.raises(CheckpointError) as err:
        load_latent_stats(path)
    assert one_line(err).startswith(f"{path}: bad mfrae.config metadata for latent statistics")


def test_mfrae_stats_refuses_an_existing_file_unless_told_to_overwrite(tmp_path, capsys):
    out = tmp_path / "stats"
    out.mkdir()
    existing = out / "stats.safetensors"
    existing.write_bytes(b"statistics another run depends on")
    argv = ["stats", "--config", "digits", "--out", str(out), "--max-images", "8", "--batch-size", "8",
            "--set", TINY_ENCODER]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(existing) in err and "--overwrite" in err
    assert existing.read_bytes() == b"statistics another run depends on"
    assert main([*argv, "--overwrite"]) == 0
    assert load_latent_stats(existing).encoder_name == "small_vit"
    (tmp_path / "stat.pt").write_bytes(b"official layout")
    assert main([*argv[:4], str(tmp_path / "stat.pt"), *argv[5:]]) == 2
    assert (tmp_path / "stat.pt").read_bytes() == b"official layout"


#################################################################################
#  5. A file of the wrong kind, or with broken metadata, is a one-line CheckpointError
#################################################################################


@pytest.fixture
def files(tmp_path):
    """One file of each kind: our DiT^DH and decoder safetensors, a released-style decoder .pt, statistics."""
    decoder = ViTDecoder(DECODER)
    paths = {
        "dit": save_model(DiTDH(DIT), tmp_path / "ema.safetensors"),
        "decoder": save_model(decoder, tmp_path / "decoder.safetensors"),
        "decoder_pt": tmp_path / "model.pt",
        "stats": save_latent_stats(LatentStats(torch.zeros(8, 4, 4), torch.ones(8, 4, 4)), tmp_path / "stats.safetensors"),
    }
    torch.save(decoder.state_dict(), paths["decoder_pt"])
    return paths


@pytest.mark.parametrize("load,given,expected,found", [
    (load_dit_dh, "decoder", "DiT^DH model", "ViT decoder"),
    (load_dit_dh, "decoder_pt", "DiT^DH model", "ViT decoder"),
    (load_dit_dh, "stats", "DiT^DH model", "latent statistics"),
    (load_vit_decoder, "dit", "ViT decoder", "DiT^DH model"),
    (load_vit_decoder, "stats", "ViT decoder", "latent statistics"),
    (load_latent_stats, "dit", "latent statistics", "DiT^DH model"),
    (load_model, "stats", "mfrae model file", "latent statistics"),
])
def test_a_file_of_the_wrong_kind_names_the_file_and_both_kinds(files, load, given, expected, found):
    with pytest.raises(CheckpointError) as err:
        load(files[given])
    message = one_line(err)
    assert message.startswith(f"{files[given]}: expected a") and expected in message and f"found a {found}" in message


def test_sample_with_a_decoder_as_ckpt_fails_in_one_line(files, tmp_path, capsys):
    argv = ["sample", "--ckpt", str(files["decoder"]), "--decoder", str(files["decoder"]), "--out",
            str(tmp_path / "samples"), "--num-samples", "2", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(files["decoder"]) in err and "expected a DiT^DH model" in err


@pytest.mark.parametrize("config,problem", [
    ("{not json", "malformed mfrae.config"),
    ("[1, 2]", "expected a mapping"),
    ('{"bogus": 1}', "unknown config key 'mfrae.config.bogus'"),
    ('{"hidden_size": "wide"}', "mfrae.config.hidden_size"),
    ('{"num_heads": [5, 7]}', "does not build a DiTDH"),  # type-checks, but 32 is not divisible by 5 heads
])
def test_broken_config_metadata_is_a_one_line_error_naming_the_file(tmp_path, config, problem):
    path = tmp_path / "ema.safetensors"
    state = {k: v.contiguous() for k, v in DiTDH(DIT).state_dict().items()}
    save_file(state, str(path), metadata={"mfrae.kind": "dit_dh", "mfrae.config": config})
    for load in (load_dit_dh, load_model):
        with pytest.raises(CheckpointError) as err:
            load(path)
        message = one_line(err)
        assert message.startswith(f"{path}: ") and problem in message, message


#################################################################################
#  6. Latent cache indexes stay inside the cache; labels stay inside the class table
#################################################################################


def _cache(tmp_path, dataset: Dataset, name: str = "cache"):
    out = tmp_path / name
    build_latent_cache(dataset, lambda images: images[:, :, :4, :4], out, shard_size=3, batch_size=3)
    return out


@pytest.mark.parametrize("entry", ["../outside/shard_00000.safetensors", "ABSOLUTE", "sub/shard_00000.safetensors", 7])
def test_a_cache_index_naming_a_file_outside_the_cache_is_refused(tmp_path, entry):
    cache = _cache(tmp_path, Images())
    index_path = cache / "index.json"
    # A valid shard sits where the entry points, so only the check on the entry itself can refuse it.
    outside = tmp_path / "outside" / "shard_00000.safetensors"
    outside.parent.mkdir()
    shutil.copy(cache / "shard_00000.safetensors", outside)
    (cache / "sub").mkdir()
    shutil.copy(cache / "shard_00000.safetensors", cache / "sub" / "shard_00000.safetensors")
    entry = str(outside) if entry == "ABSOLUTE" else entry
    index = json.loads(index_path.read_text())
    index["shards"][0] = entry
    index_path.write_text(json.dumps(index))
    with pytest.raises(DataError) as err:
        LatentDataset(cache)
    message = one_line(err)
    assert str(index_path) in message and repr(entry) in message
    assert (cache / "shard_00000.safetensors").is_file() and outside.is_file()  # nothing was removed


@pytest.mark.parametrize("labels,bad", [([0, 1, 2, 5, 0, 1], 5), ([0, 1, 2, 0, -1, 1], -1), ([0, 1, 2, 0, 1, 3], 3)])
def test_a_cache_label_outside_the_class_table_is_refused_when_opened(tmp_path, labels, bad):
    cache = _cache(tmp_path, Images(labels=labels, num_classes=3))
    with pytest.raises(DataError) as err:
        LatentDataset(cache)
    message = one_line(err)
    assert str(cache) in message and f"label {bad}," in message and "[0, 3)" in message
    assert LatentDataset(_cache(tmp_path, Images(labels=[0, 1, 2, 2, 1, 0]), "good")).labels.max() == 2


def test_a_model_class_table_smaller_than_the_data_is_refused():
    from mfrae.train.stages import dit_config

    cfg = load_train_config("teacher", "digits", ["model.options={num_classes: 5}"])
    with pytest.raises(ConfigError, match=r"model.options.num_classes=5 is fewer than the 10 classes"):
        dit_config(cfg, (8, 4, 4), 10, meanflow=False)
    assert dit_config(cfg, (8, 4, 4), 5, meanflow=False).num_classes == 5
