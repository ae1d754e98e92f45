"""Loading released files strictly (flat / {'ema'} / {'model'}), teacher -> student, bad files, our safetensors."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import randomize_
from mfrae.checkpoint import (
    infer_dit_dh_config,
    infer_vit_decoder_config,
    load_dit_dh,
    load_model,
    load_torch_file,
    load_vit_decoder,
    resolve_path,
    save_model,
)
from mfrae.errors import CheckpointError
from mfrae.models.dit_dh import DiTDH, DiTDHConfig
from mfrae.models.vit_decoder import ViTDecoder, ViTDecoderConfig

TEACHER = DiTDHConfig(input_size=4, in_channels=8, hidden_size=(32, 48), depth=(2, 1), num_heads=(2, 2), num_classes=10)
STUDENT = DiTDHConfig(**{**TEACHER.to_dict(), "interval_embedding": True})
INPUTS = (torch.randn(2, 8, 4, 4), torch.tensor([0.3, 1.0]), torch.tensor([3, 10]))


@pytest.mark.parametrize("wrap", ["flat", "ema", "model", "ddp"])
def test_official_layouts_load_and_compute_the_same(tmp_path, wrap):
    model = randomize_(DiTDH(TEACHER)).eval()
    state = model.state_dict()
    obj = {
        "flat": state,
        "ema": {"ema": state, "model": {k: torch.zeros_like(v) for k, v in state.items()}, "step": torch.tensor(3)},
        "model": {"model": state},
        "ddp": {f"module.{k}": v for k, v in state.items()},
    }[wrap]
    torch.save(obj, tmp_path / "stage2_model.pt")
    loaded = load_dit_dh(tmp_path / "stage2_model.pt").eval()
    assert loaded.config == TEACHER  # recovered from tensor shapes
    assert torch.equal(loaded(*INPUTS), model(*INPUTS))


def test_missing_and_unexpected_keys_are_listed_with_the_file(tmp_path):
    state = DiTDH(TEACHER).state_dict()
    state.pop("blocks.1.attn.qkv.bias")
    state["blocks.7.extra"] = torch.zeros(1)
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_dit_dh(path, config=TEACHER)
    message = str(err.value)
    assert "broken.pt" in message
    assert "missing keys (1): blocks.1.attn.qkv.bias" in message
    assert "unexpected keys (1): blocks.7.extra" in message


def test_shape_mismatch_is_reported(tmp_path):
    torch.save(DiTDH(TEACHER).state_dict(), tmp_path / "t.pt")
    other = DiTDHConfig(**{**TEACHER.to_dict(), "num_classes": 20})
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): y_embedder.embedding_table.weight \(file \(11, 32\), model \(21, 32\)\)"):
        load_dit_dh(tmp_path / "t.pt", config=other)


class Payload:  # an arbitrary object: must never be unpickled
    pass


def test_non_tensor_pickle_is_refused(tmp_path):
    torch.save({"ema": {"w": torch.zeros(1)}, "extra": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"evil.pt: refused to load.*weights_only=True"):
        load_dit_dh(tmp_path / "evil.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt: not a readable torch checkpoint"):
        load_torch_file(tmp_path / "garbage.pt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a dict of tensors"):
        load_torch_file(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_dit_dh(tmp_path / "absent.pt")


def test_teacher_file_initialises_a_student(tmp_path, caplog):
    teacher = randomize_(DiTDH(TEACHER))
    torch.save({"ema": teacher.state_dict()}, tmp_path / "teacher.pt")
    with caplog.at_level(logging.INFO, logger="mfrae"):
        student = load_dit_dh(tmp_path / "teacher.pt", meanflow=True)
    assert student.is_meanflow
    assert "interval embedding (5 tensors" in caplog.text
    for key, value in teacher.state_dict().items():
        assert torch.equal(student.state_dict()[key], value)
    # a student file loads as a student without notice, and refuses to load as a teacher
    torch.save({"ema": student.state_dict()}, tmp_path / "student.pt")
    assert load_dit_dh(tmp_path / "student.pt").is_meanflow
    with pytest.raises(CheckpointError, match=r"unexpected keys \(5\): r_embedder"):
        load_dit_dh(tmp_path / "student.pt", meanflow=False)


def test_shape_inference_recovers_other_architectures():
    for config in (
        DiTDHConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=(64, 32), depth=(3, 2), num_heads=(4, 1),
                    num_classes=7, interval_embedding=True),
        DiTDHConfig(input_size=6, in_channels=16, hidden_size=(24, 40), depth=(1, 3), num_heads=(1, 2), mlp_ratio=2.0,
                    num_classes=3),
    ):
        assert infer_dit_dh_config(DiTDH(config).state_dict()) == config
    decoder = ViTDecoderConfig(encoder_hidden_size=16, hidden_size=768, num_layers=1, num_heads=12,
                               intermediate_size=64, patch_size=8, num_patches=9)
    assert infer_vit_decoder_config(ViTDecoder(decoder).state_dict()) == decoder


def test_decoder_files(tmp_path):
    config = ViTDecoderConfig(encoder_hidden_size=16, hidden_size=768, num_layers=1, num_heads=12,
                              intermediate_size=64, patch_size=4, num_patches=4)
    decoder = randomize_(ViTDecoder(config), 0.02).eval()
    tokens = torch.randn(2, 4, 16)
    # an RAE training state dict: decoder.* keys are picked out
    torch.save({"ema": {f"decoder.{k}": v for k, v in decoder.state_dict().items()}}, tmp_path / "rae.pt")
    assert torch.equal(load_vit_decoder(tmp_path / "rae.pt").eval()(tokens), decoder(tokens))
    # a file without the CLS token loads with zeros in its place
    state = decoder.state_dict()
    state.pop("trainable_cls_token")
    torch.save(state, tmp_path / "nocls.pt")
    assert torch.count_nonzero(load_vit_decoder(tmp_path / "nocls.pt").trainable_cls_token) == 0


def test_safetensors_round_trip(tmp_path):
    for model, inputs in ((randomize_(DiTDH(STUDENT)).eval(), INPUTS),):
        path = save_model(model, tmp_path / "student.safetensors")
        assert not list(tmp_path.glob("*.tmp"))
        again = load_model(path).eval()
        assert again.config == model.config
        assert torch.equal(again(*inputs, r=torch.tensor([0.1, 0.2])), model(*inputs, r=torch.tensor([0.1, 0.2])))
        assert load_dit_dh(path).config == model.config  # the generic loader reads our files too
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="bad.safetensors: not a readable safetensors file"):
        load_model(tmp_path / "bad.safetensors")


def test_hub_names_fail_clearly_offline():
    with pytest.raises(FileNotFoundError, match=r"hf://nyu-visionx/RAE-collections/stats/x/stat.pt"):
        resolve_path("hf://nyu-visionx/RAE-collections/stats/x/stat.pt")
    with pytest.raises(ValueError, match="hf://OWNER/REPO"):
        resolve_path("hf://just-a-name")
