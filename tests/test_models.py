"""Model invariants against independent truth: official parameter counts, closed-form tables, wiring."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import randomize_
from mfrae.layers import RMSNorm, RotaryEmbedding2D, sincos_2d, swiglu_hidden, unpatchify
from mfrae.models.dit_dh import DiTDH, DiTDHConfig, dit_dh
from mfrae.models.encoders import build_encoder
from mfrae.models.vit_decoder import ViTDecoder, ViTDecoderConfig, vit_decoder

TINY = DiTDHConfig(input_size=4, in_channels=8, hidden_size=(32, 48), depth=(2, 1), num_heads=(2, 2), num_classes=10)


def _counts(model):
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params), len(model.state_dict())


# (trainable, all parameters, state-dict entries) measured on the official classes (docs/checkpoints.md, section 8).
@pytest.mark.parametrize(
    "size,input_size,meanflow,trainable,total,entries",
    [
        ("S", 16, False, 196_357_204, 196_455_764, 190),
        ("B", 16, False, 294_099_028, 294_295_892, 190),
        ("L", 16, False, 621_482_036, 621_744_436, 334),
        ("XL", 16, False, 838_380_628, 838_675_796, 382),
        ("XL", 32, False, 838_380_628, 839_560_532, 382),
        ("XL", 16, True, None, 840_595_284, 387),
    ],
)
def test_dit_dh_parameter_counts_match_official(size, input_size, meanflow, trainable, total, entries):
    with torch.device("meta"):
        model = dit_dh(size, input_size=input_size, interval_embedding=meanflow)
    got_trainable, got_total, got_entries = _counts(model)
    assert got_total == total
    assert got_entries == entries
    if trainable is not None:
        assert got_trainable == trainable


@pytest.mark.parametrize(
    "size,tokens,trainable,total,entries",
    [
        ("B", 256, 86_237_952, 86_435_328, 200),
        ("L", 256, 303_887_104, 304_150_272, 392),
        ("XL", 256, 415_056_640, 415_352_704, 456),
        ("XL", 1024, 415_056_640, 416_237_440, 456),
    ],
)
def test_decoder_parameter_counts_match_official(size, tokens, trainable, total, entries):
    with torch.device("meta"):
        model = vit_decoder(size, num_patches=tokens)
    assert _counts(model) == (trainable, total, entries)


def test_swiglu_widths():
    assert [swiglu_hidden(d) for d in (384, 768, 1024, 1152, 2048)] == [1024, 2048, 2730, 3072, 5461]


def test_rope_angles_closed_form():
    # grid 3, head dim 8: token (row 1, col 2) has angles [1, 1, .01, .01, 2, 2, .02, .02] (docs/checkpoints.md, 6)
    rope = RotaryEmbedding2D(head_dim=8, grid_size=3)
    angles = torch.atan2(rope.freqs_sin[1 * 3 + 2], rope.freqs_cos[1 * 3 + 2])
    assert torch.allclose(angles, torch.tensor([1, 1, 0.01, 0.01, 2, 2, 0.02, 0.02]), atol=1e-6)
    # rotation of pair (a, b) by angle theta: (a cos - b sin, b cos + a sin)
    q = torch.randn(1, 1, 9, 8)
    out = rope(q)
    c, s = rope.freqs_cos, rope.freqs_sin
    a, b = q[..., 0::2], q[..., 1::2]
    assert torch.allclose(out[..., 0::2], a * c[:, 0::2] - b * s[:, 0::2], atol=1e-6)
    assert torch.allclose(out[..., 1::2], b * c[:, 1::2] + a * s[:, 1::2], atol=1e-6)


def test_sincos_table_closed_form():
    # token (row 0, col 1), D = 8: [sin 1, sin .01, cos 1, cos .01, 0, 0, 1, 1] (docs/checkpoints.md, section 6)
    row = sincos_2d(8, 3)[1]
    expected = torch.tensor([math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01), 0, 0, 1, 1])
    assert torch.allclose(row, expected, atol=1e-6)


def test_rmsnorm_statistic_in_float32():
    x = (torch.randn(4, 64, dtype=torch.float64) * 30).to(torch.bfloat16)
    norm = RMSNorm(64).to(torch.bfloat16)
    ref = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.double(), ref, rtol=1e-2, atol=1e-2)


def test_unpatchify_pixel_layout():
    # value of token (i, j), output (a, b, c) encodes where the pixel must land: row i*p+a, col j*p+b, channel c
    g, p, C = 2, 3, 2
    tokens = torch.zeros(1, g * g, p * p * C)
    for i in range(g):
        for j in range(g):
            for a in range(p):
                for b in range(p):
                    for c in range(C):
                        tokens[0, i * g + j, (a * p + b) * C + c] = 1000 * c + 10 * (i * p + a) + (j * p + b)
    img = unpatchify(tokens, p, C)
    rows, cols = torch.meshgrid(torch.arange(g * p), torch.arange(g * p), indexing="ij")
    for c in range(C):
        assert torch.equal(img[0, c], (1000 * c + 10 * rows + cols).float())


def test_fresh_model_predicts_zero():
    # official init zeroes the adaLN and output layers
    model = DiTDH(TINY)
    out = model(torch.randn(2, 8, 4, 4), torch.rand(2), torch.tensor([1, 10]))
    assert torch.count_nonzero(out) == 0


def test_student_equals_teacher_when_interval_embedding_is_silent():
    teacher = randomize_(DiTDH(TINY)).eval()
    student = DiTDH(DiTDHConfig(**{**TINY.to_dict(), "interval_embedding": True})).eval()
    missing = student.load_state_dict(teacher.state_dict(), strict=False).missing_keys
    assert sorted(missing) == sorted(k for k in student.state_dict() if k.startswith("r_embedder."))
    with torch.no_grad():
        student.r_embedder.mlp[2].weight.zero_()
        student.r_embedder.mlp[2].bias.zero_()
    x, t, y = torch.randn(3, 8, 4, 4), torch.tensor([0.0, 0.4, 1.0]), torch.tensor([0, 5, 10])
    r = torch.tensor([0.0, 0.1, 0.3])
    assert torch.allclose(student(x, t, y, r=r), teacher(x, t, y), atol=1e-6)


def test_student_depends_on_interval_and_defaults_to_r_equals_t():
    student = randomize_(DiTDH(DiTDHConfig(**{**TINY.to_dict(), "interval_embedding": True}))).eval()
    x, t, y = torch.randn(2, 8, 4, 4), torch.tensor([0.5, 0.9]), torch.tensor([1, 2])
    assert torch.equal(student(x, t, y), student(x, t, y, r=t))
    assert not torch.allclose(student(x, t, y, r=torch.zeros(2)), student(x, t, y))
    # scalar times broadcast over the batch
    assert torch.equal(student(x, 0.5, y, r=0.0), student(x, torch.full((2,), 0.5), y, r=torch.zeros(2)))


def test_bad_inputs_raise_clear_errors():
    model = DiTDH(TINY)
    with pytest.raises(ValueError, match=r"latents of shape \[B, 8, 4, 4\]"):
        model(torch.randn(2, 8, 5, 5), torch.rand(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must have shape"):
        model(torch.randn(2, 8, 4, 4), torch.rand(2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="t must be a scalar"):
        model(torch.randn(2, 8, 4, 4), torch.rand(3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="no interval embedding"):
        model(torch.randn(2, 8, 4, 4), torch.rand(2), torch.zeros(2, dtype=torch.long), r=torch.zeros(2))
    with pytest.raises(ValueError, match="unknown DiT\\^DH size"):
        dit_dh("XXL")
    decoder = ViTDecoder(ViTDecoderConfig(encoder_hidden_size=8, hidden_size=16, num_layers=1, num_heads=2,
                                          intermediate_size=32, patch_size=2, num_patches=4))
    with pytest.raises(ValueError, match=r"tokens \[B, N, 8\]"):
        decoder(torch.randn(1, 4, 9))
    with pytest.raises(ValueError, match="unknown encoder"):
        build_encoder("no-such-encoder")


def test_decoder_resamples_off_size_token_grids():
    decoder = randomize_(ViTDecoder(ViTDecoderConfig(encoder_hidden_size=8, hidden_size=16, num_layers=1, num_heads=2,
                                                     intermediate_size=32, patch_size=2, num_patches=4))).eval()
    # a constant 3x3 grid resampled to 2x2 is the same constant grid
    tokens = torch.randn(1, 1, 8).expand(1, 9, 8)
    assert torch.allclose(decoder(tokens), decoder(tokens[:, :4]), atol=1e-6)
