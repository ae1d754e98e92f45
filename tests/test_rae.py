"""RAE: DINOv2 loading from a local folder, latent normalisation, noise augmentation, frozen encoder."""

from __future__ import annotations

import pytest
import torch

from conftest import randomize_
from mfrae.checkpoint import load_latent_stats, save_latent_stats
from mfrae.models.encoders import build_encoder
from mfrae.models.rae import RAE, LatentStats
from mfrae.models.vit_decoder import ViTDecoder, ViTDecoderConfig


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    """A 2-layer DINOv2-with-registers saved as a local Hugging Face folder (no download)."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    patch_size=4, image_size=32, num_register_tokens=4)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dinov2")
    Dinov2WithRegistersModel(cfg).save_pretrained(folder)
    return folder


def _rae(folder, **kwargs) -> RAE:
    encoder = build_encoder("dinov2", path=folder, input_size=16)
    decoder = ViTDecoder(ViTDecoderConfig(encoder_hidden_size=32, hidden_size=24, num_layers=1, num_heads=2,
                                          intermediate_size=48, patch_size=4, num_patches=16))
    return RAE(encoder, randomize_(decoder, 0.05), **kwargs)


def test_encoder_tokens_are_standardised_patch_tokens(tiny_dinov2):
    rae = _rae(tiny_dinov2).eval()
    tokens = rae.encode_tokens(torch.rand(2, 3, 20, 20))
    # 16 px input, patch 4 -> 4 x 4 = 16 patch tokens; CLS and 4 registers dropped
    assert tokens.shape == (2, 16, 32)
    # final LayerNorm without affine: every token has zero mean and unit variance over its channels
    assert torch.allclose(tokens.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(tokens.var(-1, unbiased=False), torch.ones(2, 16), atol=1e-3)
    assert rae.latent_shape == (32, 4, 4)
    assert all(not p.requires_grad for p in rae.encoder.parameters())


def test_latent_normalisation_round_trip(tiny_dinov2, tmp_path):
    mean, var = torch.randn(32, 4, 4), torch.rand(32, 4, 4) + 0.5
    stats = LatentStats(mean, var)
    rae = _rae(tiny_dinov2, stats=stats).eval()
    images = torch.rand(3, 3, 16, 16)
    raw = rae.encode_tokens(images).transpose(1, 2).reshape(3, 32, 4, 4)
    z = rae.encode(images)
    assert torch.allclose(z, (raw - mean) / torch.sqrt(var + 1e-5), atol=1e-5)
    assert torch.allclose(stats.denormalize(z), raw, atol=1e-5)
    # decode(z) decodes exactly the de-normalised tokens
    assert torch.allclose(rae.decode(z), rae.decode_tokens(raw.flatten(2).transpose(1, 2)), atol=1e-5)
    # stats survive a safetensors round trip and the official stat.pt layout
    assert torch.equal(load_latent_stats(save_latent_stats(stats, tmp_path / "s.safetensors")).var, stats.var)
    torch.save({"mean": mean[None], "var": var[None]}, tmp_path / "stat.pt")
    assert load_latent_stats(tmp_path / "stat.pt").shape == (32, 4, 4)


def test_noise_augmentation_only_in_training(tiny_dinov2):
    rae = _rae(tiny_dinov2, noise_tau=0.8)
    images = torch.rand(64, 3, 16, 16)
    clean = rae.eval().encode_tokens(images)
    assert torch.equal(rae.encode_tokens(images), clean)
    noisy = rae.train().encode_tokens(images)
    assert not rae.encoder.training
    sigma = (noisy - clean).std(dim=(1, 2))
    # sigma = tau * U[0, 1): all within [0, 0.8], mean near 0.4
    assert sigma.max() < 0.8 * 1.1 and abs(sigma.mean().item() - 0.4) < 0.1
    halfnormal = _rae(tiny_dinov2, noise_tau=0.8, noise_dist="halfnormal").train()
    s2 = (halfnormal.encode_tokens(images) - clean).std(dim=(1, 2))
    # |N(0, tau^2)| has mean tau * sqrt(2 / pi) ~ 0.64
    assert abs(s2.mean().item() - 0.8 * (2 / torch.pi) ** 0.5) < 0.15


def test_encoder_never_in_state_dict(tiny_dinov2):
    rae = _rae(tiny_dinov2, stats=LatentStats(torch.zeros(32, 4, 4), torch.ones(32, 4, 4)))
    keys = list(rae.state_dict())
    assert keys and not any(k.startswith("encoder.") for k in keys)
    assert {k.split(".")[0] for k in keys} == {"decoder", "stats"}
    rae.load_state_dict(rae.state_dict(), strict=True)  # loads strictly without encoder weights


def test_bad_rae_inputs(tiny_dinov2, tmp_path):
    with pytest.raises(ValueError, match="latent stats have shape"):
        _rae(tiny_dinov2, stats=LatentStats(torch.zeros(32, 8, 8), torch.ones(32, 8, 8)))
    with pytest.raises(ValueError, match="noise_dist"):
        _rae(tiny_dinov2, noise_dist="gaussian")
    with pytest.raises(ValueError, match=r"RGB images \[B, 3, H, W\]"):
        _rae(tiny_dinov2).encode(torch.rand(2, 1, 16, 16))
    torch.save({"mean": torch.zeros(2, 2, 2)}, tmp_path / "stat.pt")
    with pytest.raises(ValueError, match=r"stat.pt: latent statistics need a tensor 'var'"):
        load_latent_stats(tmp_path / "stat.pt")
    with pytest.raises(FileNotFoundError, match="cannot load the DINOv2 encoder"):
        build_encoder("dinov2", path=tmp_path / "missing-folder")
