"""Layers of a config (preset `common`, a stage, `--set`): a changed component kind starts its options afresh."""

from __future__ import annotations

import pytest

from mfrae.config import apply_overrides, deep_merge
from mfrae.pipeline import load_pipeline_config
from mfrae.train.stages import load_stage_config

BASE = {"data": {"kind": "folder", "options": {"root": "data/train", "image_size": 256}, "num_workers": 8}}


@pytest.mark.parametrize("order", [0, 1])
def test_a_new_data_kind_drops_the_old_kinds_options_in_any_order(order):
    overrides = ["data.kind=latents", "data.options.cache_dir=DIR"]
    out = apply_overrides(BASE, overrides if order == 0 else overrides[::-1])
    assert out["data"] == {"kind": "latents", "options": {"cache_dir": "DIR"}, "num_workers": 8}
    assert BASE["data"]["options"] == {"root": "data/train", "image_size": 256}  # the input is left as it was


def test_the_same_kind_keeps_and_extends_its_options():
    out = apply_overrides(BASE, ["data.kind=folder", "data.options.image_size=64"])
    assert out["data"]["options"] == {"root": "data/train", "image_size": 64}


def test_a_whole_options_mapping_given_with_the_new_kind_is_kept():
    out = apply_overrides(BASE, ["data.options={cache_dir: D}", "data.kind=latents"])
    assert out["data"]["options"] == {"cache_dir": "D"}


def test_a_stage_that_changes_the_kind_of_common_starts_from_its_own_options():
    stage = {"data": {"kind": "latents", "options": {"cache_dir": "C"}}, "rae": {"encoder": {"name": "mae"}}}
    base = {**BASE, "rae": {"encoder": {"name": "dinov2", "options": {"path": "p", "input_size": 224}}}}
    out = deep_merge(base, stage)
    assert out["data"]["options"] == {"cache_dir": "C"} and out["data"]["num_workers"] == 8
    assert "options" not in out["rae"]["encoder"]  # the new encoder's defaults apply
    same = deep_merge(BASE, {"data": {"kind": "folder", "options": {"image_size": 32}}})
    assert same["data"]["options"] == {"root": "data/train", "image_size": 32}


def test_the_imagenet_preset_trains_from_a_latent_cache_as_the_readme_writes_it():
    latents = ["data.kind=latents", "data.options.cache_dir=cache/in256"]
    cfg = load_stage_config("cmt", "imagenet256-xl", latents)
    assert cfg.data.kind == "latents" and cfg.data.options == {"cache_dir": "cache/in256"}
    assert load_pipeline_config("imagenet256-xl", latents).data.options == {"cache_dir": "cache/in256"}
