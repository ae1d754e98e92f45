"""Shared fixtures: the conformance folder and tiny model configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests never reach the network: Hub lookups fail fast instead of timing out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
CONFORMANCE_DIR = Path(os.environ.get("MFRAE_CONFORMANCE_DIR", REPO.parent / "shared" / "conformance"))


def conformance_cases() -> list[Path]:
    if not CONFORMANCE_DIR.is_dir():
        return []
    return sorted(p for p in CONFORMANCE_DIR.iterdir() if (p / "manifest.json").is_file())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def fast_demo(tmp_path_factory) -> Path:
    """One `mfrae demo --fast` run for the whole session (the demo's tests and the study build on it)."""
    from mfrae.cli import main

    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--fast", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster and with steadier timings on one thread (use via pytest.mark.usefixtures)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mixture():
    """The default 2-D Gaussian mixture with a closed-form flow."""
    from mfrae.flow.toy import GaussianMixture

    return GaussianMixture.default()


def randomize_(module: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Fill every trainable tensor with noise so zero-initialised layers (adaLN, outputs) carry signal."""
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.normal_(0, std)
    return module


def save_tiny_sampling_models(root: Path) -> dict[str, Path]:
    """A tiny MeanFlow student and flow-matching teacher (4 x 4 x 8 latents, 10 classes) and a 32 px ViT decoder,
    with random weights (seed 0), saved as mfrae model files under `root`: {"student", "teacher", "decoder"}."""
    from mfrae.checkpoint import save_model
    from mfrae.models.dit_dh import DiTDH, DiTDHConfig
    from mfrae.models.vit_decoder import ViTDecoder, ViTDecoderConfig

    torch.manual_seed(0)
    dit = {"input_size": 4, "in_channels": 8, "hidden_size": (32, 48), "depth": (1, 1), "num_heads": (2, 2),
           "num_classes": 10}
    paths = {}
    for name, meanflow in (("student", True), ("teacher", False)):
        paths[name] = save_model(randomize_(DiTDH(DiTDHConfig(interval_embedding=meanflow, **dit)), 0.05),
                                 root / f"{name}.safetensors")
    decoder = ViTDecoder(ViTDecoderConfig(encoder_hidden_size=8, hidden_size=32, num_layers=1, num_heads=2,
                                          intermediate_size=64, patch_size=8, num_patches=16))
    paths["decoder"] = save_model(randomize_(decoder, 0.3), root / "decoder.safetensors")  # pixels follow the noise
    return paths
