"""Conformance: our classes, loaded through the public loaders, reproduce the authors' model classes.

Every case folder under $MFRAE_CONFORMANCE_DIR (default ../shared/conformance) is one test item.
Nothing here is tuned to the shipped sizes: the architecture comes from each case's manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import CONFORMANCE_DIR, conformance_cases
from mfrae.checkpoint import infer_dit_dh_config, load_dit_dh, load_latent_stats, load_torch_file, load_vit_decoder
from mfrae.models import dit_dh, vit_decoder
from mfrae.models.encoders import build_encoder
from mfrae.models.rae import RAE

# Tolerances of the conformance README (max abs error, float32).
TOLERANCE = {"rae_dit_dh": 1e-5, "mfrae_dit_dh_mf": 1e-5, "rae_vit_decoder": 1e-5, "rae_encoder": 1e-4}


def _run_dit(case: Path, manifest: dict, inputs: dict, meanflow: bool) -> torch.Tensor:
    config = dit_dh.config_from_official(manifest["config"], interval_embedding=meanflow)
    model = load_dit_dh(case / "weights.pt", config=config).eval()
    # The released files carry no config: shape inference must recover the same architecture.
    assert infer_dit_dh_config(load_torch_file(case / "weights.pt")) == config
    if meanflow:  # official order (x, r, t, y); ours keeps t before y and names r
        return model(inputs["x"], inputs["t"], inputs["y"], r=inputs["r"])
    return model(inputs["x"], inputs["t"], inputs["y"])


def _run_decoder(case: Path, manifest: dict, inputs: dict) -> torch.Tensor:
    model = load_vit_decoder(case / "weights.pt", config=vit_decoder.config_from_official(manifest["config"])).eval()
    return model(inputs["tokens"])


def _run_encoder(case: Path, manifest: dict, inputs: dict) -> torch.Tensor:
    cfg = manifest["config"]
    encoder = build_encoder("dinov2", path=case / "hf_encoder", input_size=cfg["encoder_input_size"])
    rae = RAE(encoder, decoder=None, stats=load_latent_stats(case / cfg.get("stats", "stat.pt"), eps=cfg.get("eps", 1e-5)))
    return rae.eval().encode(inputs["images"])


@pytest.mark.parametrize("case", conformance_cases(), ids=lambda p: p.name)
def test_conformance_case(case: Path):
    manifest = json.loads((case / "manifest.json").read_text())
    kind = manifest["kind"]
    assert kind in TOLERANCE, f"{case.name}: unknown conformance kind {kind!r}"
    inputs = torch.load(case / "inputs.pt", weights_only=True)
    expected = torch.load(case / "expected.pt", weights_only=True)
    with torch.no_grad():
        if kind in ("rae_dit_dh", "mfrae_dit_dh_mf"):
            out = _run_dit(case, manifest, inputs, meanflow=kind == "mfrae_dit_dh_mf")
        elif kind == "rae_vit_decoder":
            out = _run_decoder(case, manifest, inputs)
        else:
            out = _run_encoder(case, manifest, inputs)
    (name,) = manifest["expected"]
    target = expected[name]
    assert out.shape == target.shape
    err = (out - target).abs().max().item()
    assert err <= TOLERANCE[kind], f"{case.name}: max abs error {err:.3g} > {TOLERANCE[kind]}"


def test_conformance_cases_found():
    assert conformance_cases(), f"no conformance cases under {CONFORMANCE_DIR}"
