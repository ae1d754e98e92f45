"""Conformance with diffusers' `AutoencoderRAE` (the independent implementation): tiny random autoencoders of
each encoder type saved by diffusers load into mfrae and encode / decode the same, mfrae RAEs saved with
`save_pretrained` load into diffusers and encode / decode the same, and bad folders fail in one line."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from mfrae.errors import CheckpointError  # noqa: E402
from mfrae.models import diffusers_format as hf  # noqa: E402
from mfrae.models.encoders import DINOv2Encoder, MAEEncoder, SigLIP2Encoder  # noqa: E402
from mfrae.models.rae import RAE, DiffusersLatentStats, LatentStats  # noqa: E402
from mfrae.models.vit_decoder import ViTDecoder, ViTDecoderConfig  # noqa: E402

# (encoder patch size, encoder input size): a 16 x 16 token grid each, the grid of the released 256 px models
# (diffusers rebuilds the decoder's position table scaled to a 16 x 16 grid, see the last test); decoder patch 2
SIZES = {"dinov2": (14, 224), "siglip2": (16, 256), "mae": (16, 256)}
PIXELS = 32
WIDTH = 64  # one head of 64, as diffusers derives heads = width / 64


@pytest.fixture
def siglip_4x_layout(monkeypatch):
    """diffusers reaches SigLIP's final norm as `model.vision_model.post_layernorm` (transformers 4.x); with the
    flat 5.x layout, give the model that name for itself so diffusers can build it at all."""
    module = importlib.import_module("diffusers.models.autoencoders.autoencoder_rae")
    probe = module.SiglipVisionModel(transformers.SiglipVisionConfig(hidden_size=8, num_attention_heads=1,
                                                                     num_hidden_layers=1, intermediate_size=8))
    if not hasattr(probe, "vision_model"):
        class Flat(module.SiglipVisionModel):
            vision_model = property(lambda self: self)

        monkeypatch.setattr(module, "SiglipVisionModel", Flat)


def _randomize(module: torch.nn.Module, std: float = 0.1) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not p.requires_grad:  # fixed tables (the decoder's sin-cos positions)
                continue
            p.normal_(0, std) if "weight" in name or "token" in name or "embed" in name else p.uniform_(-0.1, 0.1)


def diffusers_rae(kind: str, scaling: float = 1.0, stats: bool = True):
    patch, size = SIZES[kind]
    g = size // patch
    torch.manual_seed(0)
    mean = torch.randn(WIDTH, g, g) * 0.3 if stats else None
    std = torch.rand(WIDTH, g, g) + 0.5 if stats else None
    model = diffusers.AutoencoderRAE(
        encoder_type=kind, encoder_hidden_size=WIDTH, encoder_patch_size=patch, encoder_num_hidden_layers=1,
        decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=64, patch_size=2, encoder_input_size=size,
        encoder_norm_mean=[0.5, 0.4, 0.3], encoder_norm_std=[0.2, 0.25, 0.3], latents_mean=mean, latents_std=std,
        scaling_factor=scaling,
    )
    _randomize(model)
    return model.eval()


def images(n: int = 2, size: int = PIXELS) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.usefixtures("siglip_4x_layout")
@pytest.mark.parametrize("kind,scaling", [("dinov2", 1.0), ("siglip2", 1.0), ("mae", 1.0), ("dinov2", 0.7)])
def test_a_diffusers_folder_encodes_and_decodes_in_mfrae_as_in_diffusers(tmp_path, kind, scaling):
    theirs = diffusers_rae(kind, scaling)
    theirs.save_pretrained(tmp_path / "rae")
    ours = RAE.from_pretrained(tmp_path / "rae").eval()
    assert isinstance(ours.stats, DiffusersLatentStats) and ours.encoder.name == kind
    x = images()
    with torch.no_grad():
        z_theirs = theirs.encode(x).latent
        z_ours = ours.encode(x)
        torch.testing.assert_close(z_ours, z_theirs, rtol=1e-4, atol=1e-5)
        z = torch.randn_like(z_theirs)
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, rtol=1e-4, atol=1e-5)
    decode_only = RAE.from_pretrained(tmp_path / "rae", with_encoder=False)
    assert decode_only.encoder is None
    torch.testing.assert_close(decode_only.decode(z), ours.decode(z))


def _tiny_transformers(kind: str):
    patch, size = SIZES[kind]
    config = hf.transformers_config({"encoder_type": kind, "encoder_hidden_size": WIDTH, "encoder_patch_size": patch,
                                     "encoder_num_hidden_layers": 1})
    model = getattr(transformers, hf.ENCODER_TYPES[kind].encoder.model_class)(config)
    _randomize(model)
    return model, size


@pytest.mark.usefixtures("siglip_4x_layout")
@pytest.mark.parametrize("kind,encoder_class", [("dinov2", DINOv2Encoder), ("siglip2", SigLIP2Encoder),
                                                ("mae", MAEEncoder)])
def test_an_mfrae_rae_saved_with_save_pretrained_loads_in_diffusers(tmp_path, kind, encoder_class):
    model, size = _tiny_transformers(kind)
    encoder = encoder_class(path=f"tiny-{kind}", input_size=size, image_mean=[0.5, 0.4, 0.3],
                            image_std=[0.2, 0.25, 0.3], model=model)
    decoder = ViTDecoder(ViTDecoderConfig(encoder_hidden_size=WIDTH, hidden_size=32, num_layers=1, num_heads=2,
                                          intermediate_size=64, patch_size=2, num_patches=encoder.num_tokens))
    _randomize(decoder)
    g = encoder.grid_size
    stats = LatentStats(torch.randn(WIDTH, g, g) * 0.3, torch.rand(WIDTH, g, g) + 0.2)
    ours = RAE(encoder, decoder, stats).eval()
    ours.save_pretrained(tmp_path / "rae")
    theirs = diffusers.AutoencoderRAE.from_pretrained(tmp_path / "rae").eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x).latent, ours.encode(x), rtol=1e-4, atol=1e-5)
        z = torch.randn(2, WIDTH, g, g)
        torch.testing.assert_close(theirs.decode(z).sample, ours.decode(z), rtol=1e-4, atol=1e-5)
    # and back into mfrae: the same maps again
    again = RAE.from_pretrained(tmp_path / "rae").eval()
    with torch.no_grad():
        torch.testing.assert_close(again.encode(x), ours.encode(x), rtol=1e-4, atol=1e-5)


def _rename_file_keys(folder, rename) -> None:
    from safetensors.torch import load_file, save_file

    file = folder / hf.WEIGHTS_NAME
    state = load_file(str(file))
    save_file({rename(k): v for k, v in state.items()}, str(file), metadata={"format": "pt"})


@pytest.mark.usefixtures("siglip_4x_layout")
@pytest.mark.parametrize("kind,rename", [
    # transformers 4.x key layouts, as in folders converted before 5.x
    ("siglip2", lambda k: k.replace("encoder.", "encoder.vision_model.", 1) if k.startswith("encoder.") else k),
    ("dinov2", lambda k: k.replace("attention.q_proj", "attention.attention.query")
     .replace("attention.k_proj", "attention.attention.key").replace("attention.v_proj", "attention.attention.value")
     .replace("attention.o_proj", "attention.output.dense")),
])
def test_either_transformers_key_layout_of_the_encoder_loads(tmp_path, kind, rename):
    theirs = diffusers_rae(kind)
    theirs.save_pretrained(tmp_path / "rae")
    reference = RAE.from_pretrained(tmp_path / "rae").eval()
    _rename_file_keys(tmp_path / "rae", rename)
    renamed = RAE.from_pretrained(tmp_path / "rae").eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(renamed.encode(x), reference.encode(x))


def test_a_folder_without_statistics_normalises_nothing(tmp_path):
    diffusers_rae("dinov2", stats=False).save_pretrained(tmp_path / "rae")
    assert RAE.from_pretrained(tmp_path / "rae").stats is None


def test_diffusers_normalisation_divides_by_std_plus_1e_5():
    mean, std = torch.zeros(1, 1, 1), torch.full((1, 1, 1), 1e-5)
    stats = DiffusersLatentStats(mean, std, scaling_factor=2.0)
    z = torch.ones(1, 1, 1)
    # (1 - 0) / (1e-5 + 1e-5) * 2 = 1e5; stat.pt's formula would give 1 / sqrt(1e-10 + 1e-5) * 2 ~ 632
    assert math.isclose(float(stats.normalize(z)), 1e5, rel_tol=1e-5)
    torch.testing.assert_close(stats.denormalize(stats.normalize(z)), z)


def test_bad_folders_fail_in_one_line_naming_the_file_or_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        RAE.from_pretrained(tmp_path)
    folder = tmp_path / "rae"
    diffusers_rae("dinov2").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "AutoencoderKL"}))
    with pytest.raises(CheckpointError, match=r"config\.json.*AutoencoderKL"):
        RAE.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**config, "decoder_num_hidden_layers": 2}))
    with pytest.raises(CheckpointError, match=r"missing \[decoder\.decoder_layers\.1\."):
        RAE.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config))
    _rename_file_keys(folder, lambda k: k.replace("decoder.decoder_norm.", "decoder.final_norm."))
    with pytest.raises(CheckpointError, match="unexpected .*decoder.final_norm.weight"):
        RAE.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="not a diffusers AutoencoderRAE folder"):
        RAE.from_pretrained(tmp_path / "nothing-here")


def test_save_pretrained_refuses_what_diffusers_cannot_rebuild(tmp_path):
    decoder = ViTDecoder(ViTDecoderConfig(encoder_hidden_size=WIDTH, hidden_size=32, num_layers=1, num_heads=2,
                                          intermediate_size=64, patch_size=2, num_patches=256))
    base = dict(hidden_size=WIDTH, patch_size=14, image_size=518, num_hidden_layers=1)
    for change, named in (({"num_attention_heads": 2}, "num_attention_heads=2"),  # diffusers: 1 head of 64
                          ({"num_attention_heads": 1, "mlp_ratio": 2}, "mlp")):
        model = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**base, **change))
        encoder = DINOv2Encoder(path="tiny", input_size=224, model=model)
        with pytest.raises(ValueError, match=f"diffusers would rebuild.*{named}"):
            RAE(encoder, decoder).save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_diffusers_rebuilds_the_official_decoder_position_table_only_on_a_16_x_16_grid():
    """The released decoders store MAE's sin-cos table at integer positions (mfrae's decoder builds exactly
    that); diffusers, which does not store it, scales positions by 16 / grid: the same table at 256 px, positions
    halved on the 32 x 32 grid of the 512 px decoder (there mfrae follows the checkpoint, not diffusers)."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    from mfrae.layers import sincos_1d

    for grid, scale in ((16, 1), (32, 0.5)):
        theirs = get_2d_sincos_pos_embed(64, grid, cls_token=True, extra_tokens=1, output_type="pt")[1:].float()
        ours = ViTDecoder(ViTDecoderConfig(encoder_hidden_size=8, hidden_size=64, num_layers=1, num_heads=1,
                                           intermediate_size=8, patch_size=1, num_patches=grid * grid))
        assert torch.allclose(theirs, ours.decoder_pos_embed[0, 1:], atol=1e-5) == (scale == 1)
        rows, cols = torch.meshgrid(torch.arange(grid) * scale, torch.arange(grid) * scale, indexing="ij")
        scaled = torch.cat([sincos_1d(32, cols.reshape(-1)), sincos_1d(32, rows.reshape(-1))], dim=1).float()
        torch.testing.assert_close(theirs, scaled, atol=1e-5, rtol=1e-5)


def test_round_trip_diffusers_rae_to_mfrae_sampling(tmp_path):
    """`mfrae sample --rae FOLDER`: the images are diffusers' decoding of mfrae's 1-step latents."""
    import numpy as np

    from mfrae.checkpoint import save_model
    from mfrae.cli import main
    from mfrae.flow.samplers import meanflow_sample
    from mfrae.generation import sample_noise
    from mfrae.models.dit_dh import DiTDH, DiTDHConfig

    theirs = diffusers_rae("dinov2")
    theirs.save_pretrained(tmp_path / "rae")
    torch.manual_seed(0)
    student = DiTDH(DiTDHConfig(input_size=16, in_channels=WIDTH, hidden_size=(32, 48), depth=(1, 1),
                                num_heads=(2, 2), num_classes=10, interval_embedding=True))
    _randomize(student, 0.05)
    save_model(student, tmp_path / "student.safetensors")
    out = tmp_path / "samples"
    assert main(["sample", "--ckpt", str(tmp_path / "student.safetensors"), "--rae", str(tmp_path / "rae"),
                 "--steps", "1", "--num-samples", "4", "--labels", "0,1,2,3", "--out", str(out), "--no-png",
                 "--device", "cpu"]) == 0
    written = np.load(out / "samples.npz")["arr_0"]
    with torch.no_grad():
        z = meanflow_sample(student.eval(), sample_noise(student.latent_shape, range(4), 0), torch.arange(4), steps=1)
        expected = (theirs.decode(z).sample.clamp(0, 1) * 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()
    assert written.shape == (4, PIXELS, PIXELS, 3)
    assert np.abs(written.astype(int) - expected.astype(int)).max() <= 1


def test_rae_sources_are_one_or_the_other(tmp_path):
    from mfrae.errors import ConfigError
    from mfrae.pipeline import RAEConfig, check_rae_sources

    with pytest.raises(ConfigError, match=r"rae.pretrained .* unset rae.decoder and rae.stats"):
        check_rae_sources(RAEConfig(pretrained="owner/rae", decoder="d.pt", stats="s.pt"))
    check_rae_sources(RAEConfig(pretrained="owner/rae"))
    with pytest.raises(FileNotFoundError, match="cannot download the Hub model folder nobody/no-such-rae"):
        RAE.from_pretrained("hf://nobody/no-such-rae")  # the tests run offline (conftest)
