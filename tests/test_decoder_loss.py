"""Stage-1 decoder objective: L1 / perceptual / adaptive-weight GAN, DiffAugment, discriminator updates,
checkpoint state, LPIPS and DINO weight files."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import randomize_
from mfrae.errors import CheckpointError, ConfigError
from mfrae.models.encoders import IMAGENET_MEAN, IMAGENET_STD, RepresentationEncoder, build_encoder
from mfrae.models.rae import RAE
from mfrae.models.vit_decoder import ViTDecoder, ViTDecoderConfig
from mfrae.train.decoder_loss import (
    LPIPS,
    DecoderLoss,
    DiffAugParams,
    DinoViT,
    EncoderFeatureMaps,
    apply_diffaug,
    default_key_depths,
    diff_augment,
    hinge_d_loss,
    quantize_8bit,
    sample_diffaug,
)

#################################################################################
#                                 Fixtures                                      #
#################################################################################


class TinyEncoder(RepresentationEncoder):
    """Patchify conv + LayerNorm without affine: 16 px -> 4 x 4 tokens of 16 channels; fixed weights per seed."""

    name = "tiny"

    def __init__(self, hidden: int = 16, seed: int = 0):
        super().__init__()
        self.input_size, self.patch_size, self.hidden_size = 16, 4, hidden
        rng = torch.get_rng_state()
        torch.manual_seed(seed)  # every TinyEncoder is the same frozen network, whatever the caller's RNG
        self.proj = nn.Conv2d(3, hidden, 4, 4)
        torch.set_rng_state(rng)
        self._set_image_normalisation(IMAGENET_MEAN, IMAGENET_STD)
        self._freeze()

    def features(self, pixels):
        tokens = self.proj(pixels).flatten(2).transpose(1, 2)
        return F.layer_norm(tokens, (self.hidden_size,))


def tiny_decoder(hidden: int = 16, randomize: bool = True) -> ViTDecoder:
    cfg = ViTDecoderConfig(encoder_hidden_size=hidden, hidden_size=24, num_layers=1, num_heads=2, intermediate_size=48,
                           patch_size=4, num_patches=16)
    net = ViTDecoder(cfg)  # its own init for training; noise everywhere (LayerNorms too) for exactness checks
    return randomize_(net, 0.05) if randomize else net


def images(n: int = 4, size: int = 16) -> torch.Tensor:
    """Smooth synthetic images in [0, 1], quantised to 8 bits like real data."""
    g = torch.linspace(0, 1, size)
    base = torch.stack([g[None, :].expand(size, size), g[:, None].expand(size, size), (g[None, :] * g[:, None])])
    phase = torch.arange(n).float()[:, None, None, None]
    x = (0.5 + 0.4 * torch.sin(3 * base[None] + phase)).clamp(0, 1)
    return torch.round(x * 255) / 255


def make_loss(**options) -> DecoderLoss:
    defaults = dict(noise_tau=0.0, gan_start_step=0, disc_start_step=0)
    defaults.update(options)
    return DecoderLoss(TinyEncoder(), **defaults)


def heads_state(loss: DecoderLoss) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in loss.discriminator.heads.state_dict().items()}


#################################################################################
#                                  Losses                                       #
#################################################################################


def test_l1_term_is_the_mean_absolute_error():
    loss = make_loss(perceptual="none", discriminator="none")
    net, x = tiny_decoder(), images()
    enc = loss.encoder
    with torch.no_grad():
        recon = net(enc(x)) * enc.image_std + enc.image_mean
    expected = (recon - x).abs().mean(dim=(1, 2, 3))
    out = loss(net, x, None, step=10**6)
    assert out.shape == (4,)
    torch.testing.assert_close(out, expected)
    assert set(loss.last_stats) == {"l1"}


@pytest.mark.parametrize("dist", ["uniform", "halfnormal"])
def test_noise_augmentation_matches_the_rae(dist):
    """Same noise as RAE.add_noise for the same RNG state: L1 of the noisy reconstruction of a train-mode RAE."""
    loss = make_loss(noise_tau=0.8, noise_dist=dist, perceptual="none", discriminator="none")
    net, x = tiny_decoder(), images()
    torch.manual_seed(3)
    out = loss(net, x)
    torch.manual_seed(3)
    with torch.no_grad():
        recon = RAE(loss.encoder, net, noise_tau=0.8, noise_dist=dist).train()(x)
    torch.testing.assert_close(out.detach(), (recon - x).abs().mean(dim=(1, 2, 3)))
    assert not torch.allclose(out.detach(), make_loss(perceptual="none", discriminator="none")(net, x).detach())


def test_encoder_perceptual_term_and_its_gradient():
    loss = make_loss(discriminator="none", l1_weight=0.0)
    net, x = tiny_decoder(), images()
    out = loss(net, x)
    enc = loss.encoder
    recon = net(enc(x)) * enc.image_std + enc.image_mean
    a, b = F.normalize(enc(recon), dim=-1), F.normalize(enc(x), dim=-1)
    torch.testing.assert_close(out, (a - b).pow(2).sum(-1).mean(-1), rtol=1e-4, atol=1e-6)
    out.mean().backward()
    assert net.decoder_pred.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.parameters())
    assert float(loss.perceptual(x, x).abs().max()) < 1e-6


def test_gan_term_and_discriminator_wait_for_their_start_steps():
    loss = make_loss(gan_start_step=5, disc_start_step=3)
    plain = make_loss(discriminator="none")
    net, x = tiny_decoder(), images()
    before = heads_state(loss)
    for step in range(3):
        torch.testing.assert_close(loss(net, x, None, step), plain(net, x, None, step))
        assert "gan" not in loss.last_stats
        assert loss.discriminator_step(net, x, step) == {}
    assert all(torch.equal(v, heads_state(loss)[k]) for k, v in before.items())  # parameters and SN buffers
    assert loss.disc_optimizer.state_dict()["state"] == {}

    stats = loss.discriminator_step(net, x, 3)
    assert {"disc_loss", "disc_logits_real", "disc_logits_fake", "disc_lr"} <= set(stats)
    after = heads_state(loss)
    assert any(not torch.equal(before[k], after[k]) for k in before if "original" in k)
    assert "gan" not in loss.last_stats and torch.allclose(loss(net, x, None, 4), plain(net, x, None, 4))
    loss(net, x, None, 5)
    assert {"gan", "adaptive_weight"} <= set(loss.last_stats)


def test_discriminator_steps_lower_the_hinge_loss_on_a_fixed_batch():
    loss = make_loss(diffaug=False, disc_lr=2e-3)
    net, x = tiny_decoder(), images()
    losses = [loss.discriminator_step(net, x, step)["disc_loss"] for step in range(12)]
    assert losses[-1] < losses[0] - 0.1, losses
    # The returned value is the hinge loss on the quantised un-noised reconstruction, computed independently:
    with torch.no_grad():
        enc = loss.encoder
        fake = quantize_8bit((net(enc(x)) * enc.image_std + enc.image_mean) * 2 - 1)
        logits = loss.discriminator(torch.cat([x * 2 - 1, fake]))
        expected = hinge_d_loss(*logits.chunk(2))
        got = loss.discriminator_loss(net, x)[0]
    torch.testing.assert_close(got, expected)


def test_generator_never_accumulates_into_the_discriminator():
    loss = make_loss()
    net, x = tiny_decoder(), images()
    loss(net, x, None, 0).mean().backward()
    assert all(p.grad is None for p in loss.discriminator.heads.parameters())
    assert all(not p.requires_grad for p in loss.discriminator.heads.parameters())


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    # eval(): spectral norm stops its power iteration, so the independent discriminator calls see the same weights.
    loss = make_loss(diffaug=False, perceptual_weight=0.5, gan_weight=0.75).eval()
    net, x = tiny_decoder(), images()
    W = net.decoder_pred.weight
    out = loss(net, x, None, 0)
    lam = loss.last_stats["adaptive_weight"]

    enc = loss.encoder
    recon = net(enc(x)) * enc.image_std + enc.image_mean
    rec = ((recon - x).abs().mean(dim=(1, 2, 3)) + 0.5 * loss.perceptual(recon, x)).mean()
    gan = -loss.discriminator(recon * 2 - 1).mean()
    g_rec = torch.autograd.grad(rec, W, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, W, retain_graph=True)[0]
    expected = g_rec.norm() / (g_gan.norm() + 1e-6)
    torch.testing.assert_close(lam, expected, rtol=1e-4, atol=0)
    torch.testing.assert_close(out.mean(), rec + 0.75 * expected * gan, rtol=1e-5, atol=1e-6)
    # lambda is a constant for the backward pass: dL/dW = g_rec + w_G lambda g_gan.
    out.mean().backward()
    torch.testing.assert_close(W.grad, g_rec + 0.75 * lam * g_gan, rtol=1e-4, atol=1e-7)

    clamped = make_loss(diffaug=False, max_adaptive_weight=1e-3).eval()
    clamped.discriminator.load_state_dict(loss.discriminator.state_dict())
    clamped(net, x, None, 0)
    assert float(clamped.last_stats["adaptive_weight"]) == pytest.approx(min(1e-3, float(expected)))


def test_adaptive_weight_through_a_wrapper_with_module():
    """A DDP-like wrapper: the last layer is reached through `.module`."""

    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, tokens):
            return self.module(tokens)

    loss = make_loss(diffaug=False).eval()
    net, x = tiny_decoder(), images()
    torch.testing.assert_close(loss(Wrapper(net), x), loss(net, x))


def test_no_grad_call_leaves_out_the_gan_term():
    loss = make_loss()
    net, x = tiny_decoder(), images()
    with torch.no_grad():
        out = loss(net, x, None, 0)
    assert out.shape == (4,) and "gan" not in loss.last_stats


#################################################################################
#                                DiffAugment                                    #
#################################################################################


def test_diffaug_shape_gradient_and_draw_ranges():
    x = (torch.rand(6, 3, 16, 16) * 2 - 1).requires_grad_()
    y = diff_augment(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    p = sample_diffaug(1000, 16, 16)
    assert p.brightness.min() >= -0.5 and p.brightness.max() < 0.5
    assert p.saturation.min() >= 0 and p.saturation.max() < 2
    assert p.contrast.min() >= 0.5 and p.contrast.max() < 1.5
    assert p.shift.abs().max() == 2 and p.shift.dtype == torch.int64  # 1/8 of 16 px
    assert len(set(p.brightness.tolist())) > 900  # per-sample magnitudes
    # The batch decision: with prob 0 nothing happens, with prob 1 everything.
    none = sample_diffaug(4, 16, 16, prob=0.0)
    assert none == DiffAugParams() and torch.equal(diff_augment(x, prob=0.0), x)
    torch.manual_seed(5)
    a = diff_augment(x)
    torch.manual_seed(5)
    torch.testing.assert_close(a, apply_diffaug(x, sample_diffaug(6, 16, 16)))


def test_translation_moves_content_by_the_offset():
    x = torch.zeros(2, 3, 16, 16)
    x[:, :, 5, 6] = 1.0
    shift = torch.tensor([[2, -3], [-1, 4]])
    y = apply_diffaug(x, DiffAugParams(shift=shift))
    for b, (dy, dx) in enumerate(shift.tolist()):
        expected = torch.zeros(3, 16, 16)
        expected[:, 5 + dy, 6 + dx] = 1.0
        torch.testing.assert_close(y[b], expected)
    # Content leaving the frame is gone; uncovered pixels are zero (not wrapped around).
    ones = torch.ones(1, 1, 8, 8)
    moved = apply_diffaug(ones, DiffAugParams(shift=torch.tensor([[2, -1]])))
    assert moved[0, 0, :2].abs().sum() == 0 and moved[0, 0, :, -1:].abs().sum() == 0
    assert moved.sum() == 6 * 7


def test_colour_ops_follow_their_formulas():
    torch.manual_seed(1)
    x = torch.rand(2, 3, 4, 4) * 2 - 1
    r = torch.tensor([0.3, -0.2])
    torch.testing.assert_close(apply_diffaug(x, DiffAugParams(brightness=r)), x + r.view(2, 1, 1, 1))
    s = torch.tensor([1.5, 0.25])
    got = apply_diffaug(x, DiffAugParams(saturation=s))
    for b in range(2):
        for i in range(4):
            for j in range(4):
                pixel = x[b, :, i, j]
                torch.testing.assert_close(got[b, :, i, j], (pixel - pixel.mean()) * s[b] + pixel.mean())
    c = torch.tensor([0.75, 1.4])
    got = apply_diffaug(x, DiffAugParams(contrast=c))
    for b in range(2):
        torch.testing.assert_close(got[b], (x[b] - x[b].mean()) * c[b] + x[b].mean())
    # All together, in the order brightness -> saturation -> contrast -> translation.
    both = apply_diffaug(x, DiffAugParams(brightness=r, saturation=s, contrast=c, shift=torch.tensor([[1, 0], [0, 0]])))
    step = x + r.view(2, 1, 1, 1)
    step = (step - step.mean(1, keepdim=True)) * s.view(2, 1, 1, 1) + step.mean(1, keepdim=True)
    step = (step - step.mean((1, 2, 3), keepdim=True)) * c.view(2, 1, 1, 1) + step.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(both[1], step[1])
    torch.testing.assert_close(both[0, :, 1:], step[0, :, :-1])
    assert both[0, :, 0].abs().sum() == 0


def test_quantize_8bit():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.2, 1.0, 3.0])
    q = quantize_8bit(x)
    torch.testing.assert_close(q, torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1)
    levels = (q + 1) * 127.5
    torch.testing.assert_close(levels, levels.round())


#################################################################################
#                               Checkpoints                                     #
#################################################################################


def test_state_dict_holds_discriminator_and_optimizer_only(tmp_path):
    loss = make_loss()
    net, x = tiny_decoder(), images()
    for step in range(2):
        loss.discriminator_step(net, x, step)
    state = loss.state_dict()
    assert set(state) == {"discriminator", "disc_optimizer"}
    heads = loss.discriminator.heads
    assert set(state["discriminator"]) == set(heads.state_dict())
    assert sum(v.numel() for v in state["discriminator"].values()) == (
        sum(p.numel() for p in heads.parameters()) + sum(b.numel() for b in heads.buffers())
    )
    assert all(k.split(".")[0].isdigit() for k in state["discriminator"])  # head i's tensors, nothing frozen
    assert state["disc_optimizer"]["state"]  # Adam moments exist after two steps
    torch.save(state, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)

    torch.manual_seed(123)  # a differently initialised fresh loss
    fresh = make_loss()
    assert not all(torch.equal(v, heads_state(fresh)[k]) for k, v in heads_state(loss).items())
    fresh.load_state_dict(state)
    torch.manual_seed(7)
    a = loss.discriminator_step(net, x, 2)
    torch.manual_seed(7)
    b = fresh.discriminator_step(net, x, 2)
    assert a == b
    for k, v in heads_state(loss).items():
        assert torch.equal(v, heads_state(fresh)[k]), k
    torch.manual_seed(8)
    ga = loss(net, x, None, 3)
    torch.manual_seed(8)
    assert torch.equal(ga, fresh(net, x, None, 3))

    dropped = "0.out.bias"
    bad = dict(state, discriminator={k: v for k, v in state["discriminator"].items() if k != dropped})
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): 0\.out\.bias"):
        fresh.load_state_dict(bad)
    with pytest.raises(CheckpointError, match="disc_optimizer"):
        fresh.load_state_dict({"discriminator": state["discriminator"]})
    assert make_loss(discriminator="none").state_dict() == {}


#################################################################################
#                           Hugging Face DINOv2 encoder                          #
#################################################################################


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    cfg = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                                    patch_size=4, image_size=32, num_register_tokens=4)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dinov2")
    Dinov2WithRegistersModel(cfg).save_pretrained(folder)
    return folder


def test_dinov2_encoder_exposes_intermediate_maps(tiny_dinov2):
    encoder = build_encoder("dinov2", path=tiny_dinov2, input_size=16)
    assert default_key_depths(12) == (2, 5, 8, 11) and default_key_depths(4) == (0, 1, 2, 3)
    x = images(2)
    maps = EncoderFeatureMaps(encoder, (1, 3))(x)
    pixels = (x - encoder.image_mean) / encoder.image_std
    hidden = encoder.model(pixel_values=pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(maps[0], encoder(x))
    torch.testing.assert_close(maps[1], hidden[2][:, 5:])
    torch.testing.assert_close(maps[2], hidden[4][:, 5:])
    with pytest.raises(ConfigError, match="outside"):
        EncoderFeatureMaps(encoder, (4,))
    with pytest.raises(ConfigError, match="final tokens"):
        EncoderFeatureMaps(TinyEncoder(), (0,))

    loss = DecoderLoss(encoder, gan_start_step=0, disc_start_step=0)
    assert len(loss.discriminator.heads) == 5  # final + blocks 0..3
    net = tiny_decoder(32)
    out = loss(net, x, None, 0)
    assert out.shape == (2,) and torch.isfinite(out).all() and "adaptive_weight" in loss.last_stats
    assert loss.discriminator(x * 2 - 1).shape == (2, 5 * 16)
    assert math.isfinite(loss.discriminator_step(net, x, 0)["disc_loss"])
    assert not any("model." in k for k in loss.state_dict()["discriminator"])


#################################################################################
#                               LPIPS and DINO                                  #
#################################################################################


def _save_lpips_files(folder, lin_value: float | None = None) -> LPIPS:
    model = LPIPS()
    with torch.no_grad():
        for p in model.lins.parameters():
            p.copy_(torch.rand_like(p) if lin_value is None else torch.full_like(p, lin_value))
    vgg_state = dict(model.net.state_dict())
    vgg_state["classifier.0.weight"] = torch.zeros(2, 2)  # present in torchvision's file, ignored
    torch.save(vgg_state, folder / "vgg16-397923af.pth")
    torch.save(model.lins.state_dict(), folder / "vgg.pth")
    return model


def _reference_lpips(folder, a, b):
    """VGG16-LPIPS with unit linear heads, written out with functional ops from the saved files."""
    vgg = torch.load(folder / "vgg16-397923af.pth", weights_only=True)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    convs = [0, 2, "M", 5, 7, "M", 10, 12, 14, "M", 17, 19, 21, "M", 24, 26, 28]
    taps = {2, 7, 14, 21, 28}

    def feats(x):
        h, out = ((2 * x - 1) - shift) / scale, []
        for c in convs:
            if c == "M":
                h = F.max_pool2d(h, 2)
                continue
            h = F.relu(F.conv2d(h, vgg[f"features.{c}.weight"], vgg[f"features.{c}.bias"], padding=1))
            if c in taps:
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    return sum((fa - fb).pow(2).sum(1).mean(dim=(1, 2)) for fa, fb in zip(feats(a), feats(b)))


def test_lpips_from_local_files(tmp_path):
    _save_lpips_files(tmp_path, lin_value=1.0)
    lpips = LPIPS.from_spec(tmp_path)
    a, b = images(2), images(2).flip(-1)
    with torch.no_grad():
        d = lpips(a, b)
    assert d.shape == (2,) and (d > 0).all()
    torch.testing.assert_close(d, _reference_lpips(tmp_path, a, b), rtol=1e-4, atol=1e-6)
    assert float(lpips(a, a).abs().max()) < 1e-6
    LPIPS.from_spec(f"{tmp_path / 'vgg16-397923af.pth'},{tmp_path / 'vgg.pth'}")

    loss = DecoderLoss(TinyEncoder(), noise_tau=0.0, perceptual="lpips", lpips_weights=str(tmp_path),
                       discriminator="none")
    out = loss(tiny_decoder(), a)
    out.mean().backward()
    assert torch.isfinite(out).all() and "perceptual" in loss.last_stats
    assert loss.state_dict() == {}


def test_lpips_loading_errors_name_file_and_key(tmp_path):
    _save_lpips_files(tmp_path)
    vgg_file = tmp_path / "vgg16-397923af.pth"
    state = torch.load(vgg_file, weights_only=True)
    del state["features.28.bias"]
    torch.save(state, vgg_file)
    with pytest.raises(CheckpointError, match=r"vgg16-397923af\.pth.*\n.*features\.28\.bias"):
        LPIPS.from_spec(tmp_path)
    _save_lpips_files(tmp_path)
    lin_file = tmp_path / "vgg.pth"
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, lin_file)
    with pytest.raises(CheckpointError, match=r"vgg\.pth.*\n.*lin1\.model\.1\.weight"):
        LPIPS.from_spec(tmp_path)
    lin_file.unlink()
    with pytest.raises(FileNotFoundError, match=r"vgg\.pth"):
        LPIPS.from_spec(tmp_path)
    with pytest.raises(ConfigError, match="lpips_weights"):
        DecoderLoss(TinyEncoder(), perceptual="lpips")


def _save_tiny_dino(path) -> DinoViT:
    vit = DinoViT(img_size=32, patch_size=8, dim=64, depth=12, num_heads=1)
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0, 0.1)
    state = dict(vit.state_dict())
    state["head.weight"] = torch.zeros(10, 64)  # a classifier head, ignored
    torch.save(state, path)
    return vit


def test_dino_discriminator_from_a_local_file(tmp_path):
    path = tmp_path / "dino_vit_small_patch8_224.pth"
    original = _save_tiny_dino(path)
    vit = DinoViT.from_file(path)
    assert (vit.img_size, vit.patch_size, vit.dim, vit.depth) == (32, 8, 64, 12)
    qkv = vit.blocks[3].attn.qkv.bias
    assert qkv[64:128].abs().sum() == 0
    torch.testing.assert_close(qkv[:64], original.blocks[3].attn.qkv.bias[:64])
    torch.testing.assert_close(qkv[128:], original.blocks[3].attn.qkv.bias[128:])
    # Zeroing the key bias changes no output (softmax is invariant to a per-query constant).
    x = images(2, 32) * 2 - 1
    for a, b in zip(vit(x), original(x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    maps = vit(x)
    assert len(maps) == 5 and all(m.shape == (2, 16, 64) for m in maps)
    torch.testing.assert_close(maps[0], maps[-1])  # the final output and block 11 coincide

    loss = DecoderLoss(TinyEncoder(), noise_tau=0.0, discriminator="dino", dino_weights=str(path),
                       gan_start_step=0, disc_start_step=0)
    assert len(loss.discriminator.heads) == 5
    net = tiny_decoder()
    out = loss(net, images())  # 16 px reconstructions are resized to the ViT's 32 px
    out.mean().backward()
    assert torch.isfinite(out).all() and "adaptive_weight" in loss.last_stats
    stats = loss.discriminator_step(net, images(), 0)
    assert math.isfinite(stats["disc_loss"])
    keys = loss.state_dict()["discriminator"]
    assert keys and not any(k.startswith(("vit", "blocks", "features")) for k in keys)


def test_dino_loading_errors_name_file_and_key(tmp_path):
    path = tmp_path / "dino.pth"
    _save_tiny_dino(path)
    state = torch.load(path, weights_only=True)
    del state["blocks.3.attn.proj.weight"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"dino\.pth.*\n.*blocks\.3\.attn\.proj\.weight"):
        DinoViT.from_file(path)
    torch.save({"cls_token": torch.zeros(1, 1, 64)}, path)
    with pytest.raises(CheckpointError, match=r"dino\.pth: missing key 'patch_embed\.proj\.weight'"):
        DinoViT.from_file(path)
    with pytest.raises(ConfigError, match="dino_weights"):
        DecoderLoss(TinyEncoder(), discriminator="dino")
    _save_tiny_dino(path)
    with pytest.raises(ConfigError, match="outside"):
        DecoderLoss(TinyEncoder(), discriminator="dino", dino_weights=str(path), disc_layers=(12,))


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(noise_dist="gauss"), "noise_dist"),
        (dict(perceptual="vgg"), "perceptual"),
        (dict(discriminator="stylegan"), "discriminator"),
        (dict(gan_weight=-1.0), "gan_weight"),
        (dict(noise_tau=float("nan")), "noise_tau"),
        (dict(diffaug_prob=2.0), "diffaug_prob"),
        (dict(disc_kernel_size=4), "disc_kernel_size"),
    ],
)
def test_bad_options_are_named(options, match):
    with pytest.raises(ConfigError, match=match):
        DecoderLoss(TinyEncoder(), **options)


#################################################################################
#                                 Training                                      #
#################################################################################


def test_training_reduces_the_reconstruction_error():
    loss = DecoderLoss(TinyEncoder(), noise_tau=0.8, gan_start_step=10, disc_start_step=5)
    net, x = tiny_decoder(randomize=False), images(4)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)

    def l1() -> float:
        with torch.no_grad():
            return float((RAE(loss.encoder, net).eval()(x) - x).abs().mean())

    start = l1()
    for step in range(20):
        out = loss(net, x, None, step).mean()
        opt.zero_grad(set_to_none=True)
        out.backward()
        opt.step()
        stats = loss.discriminator_step(net, x, step)
        assert (stats != {}) == (step >= 5)
    assert "gan" in loss.last_stats
    assert l1() < 0.8 * start


#################################################################################
#                          torch.distributed (slow)                             #
#################################################################################


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        net = tiny_decoder()
        torch.manual_seed(100 + rank)  # ranks build different heads: rank 0's must win
        loss = DecoderLoss(TinyEncoder(), noise_tau=0.0, diffaug=False, gan_start_step=0, disc_start_step=0)
        x = images(4)[2 * rank : 2 * rank + 2]
        ddp = DistributedDataParallel(net)
        out = loss(ddp, x, None, 0).mean()
        out.backward()  # DDP averages the decoder gradients; autograd.grad for lambda did not disturb it
        stats = loss.discriminator_step(ddp, x, 0)
        disc_grads = [p.grad for p in loss.discriminator.heads.parameters()]  # kept until the next step
        result = {"heads": heads_state(loss), "disc_grads": disc_grads, "stats": stats,
                  "grad": net.decoder_pred.weight.grad}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_discriminator_gradients_are_averaged_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k, v in r0["heads"].items():
        assert torch.equal(v, r1["heads"][k]), k
    torch.testing.assert_close(r0["grad"], r1["grad"])

    # One process on the whole batch from rank 0's initial heads gives the same update (mean of equal halves).
    torch.manual_seed(0)
    net = tiny_decoder()
    torch.manual_seed(100)
    loss = DecoderLoss(TinyEncoder(), noise_tau=0.0, diffaug=False, gan_start_step=0, disc_start_step=0)
    loss(net, images(4)[:2], None, 0)  # the same power iteration as the ranks' generator pass
    loss.discriminator_step(net, images(4), 0)
    for g, g0 in zip((p.grad for p in loss.discriminator.heads.parameters()), r0["disc_grads"]):
        torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-7)
    for k, v in heads_state(loss).items():  # Adam's first step is about +-lr wherever |grad| >> eps
        torch.testing.assert_close(v, r0["heads"][k], rtol=0, atol=1e-4)
