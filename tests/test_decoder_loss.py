"""Decoder stage objective: L1 / perceptual / adaptive-weight GAN generator loss, DiffAugment, the discriminator
player (its loss and hand-run engine turns), options, encoder feature maps, LPIPS and DINO weight files."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import randomize_
from mfrae.config import from_dict
from mfrae.errors import CheckpointError, ConfigError
from mfrae.models.discriminator import DinoViT
from mfrae.models.encoders import IMAGENET_MEAN, IMAGENET_STD, RepresentationEncoder, build_encoder
from mfrae.models.perceptual import LPIPS, EncoderFeatureMaps
from mfrae.models.rae import RAE
from mfrae.models.vit_decoder import ViTDecoder, ViTDecoderConfig
from mfrae.train.augment import DiffAugParams, apply_diffaug, augmenter, diff_augment, sample_diffaug
from mfrae.train.decoder_loss import DecoderLoss
from mfrae.train.decoder_parts import DecoderObjectiveOptions, build_decoder_objective, default_key_depths
from mfrae.train.gan import hinge_d_loss, quantize_8bit
from mfrae.train.parts import Player

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


def build(net: nn.Module | None = None, encoder: RepresentationEncoder | None = None, noise_tau: float = 0.0,
          noise_dist: str = "uniform", lr_factor=None, **options) -> tuple[DecoderLoss, Player | None, nn.Module]:
    """(generator loss, discriminator player or None, decoder) as the decoder stage builds them."""
    net = tiny_decoder() if net is None else net
    rae = RAE(encoder or TinyEncoder(), None, None, noise_tau=noise_tau, noise_dist=noise_dist)
    options = {"gan_start_step": 0, "disc_start_step": 0, **options}
    loss, players = build_decoder_objective(DecoderObjectiveOptions(**options), rae, net, lr_factor)
    assert len(players) <= 1
    return loss, (players[0] if players else None), net


class Turns:
    """The engine's turns of a player, by hand (see `mfrae.train.parts.Player`): AdamW from `PlayerOptim`, the
    learning rate `optim.lr * lr_factor(step)`, trainable only during the turn."""

    def __init__(self, player: Player):
        self.player = player
        o = player.optim
        self.optimizer = torch.optim.AdamW(player.module.parameters(), lr=o.lr, betas=o.betas, eps=o.eps,
                                           weight_decay=o.weight_decay)

    def __call__(self, net: nn.Module, x: torch.Tensor, step: int) -> dict[str, float]:
        p = self.player
        if step < p.start_step:
            return {}
        lr = p.optim.lr * (p.lr_factor(step) if p.lr_factor is not None else 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        p.module.requires_grad_(True)
        try:
            loss, stats = p.loss(net, x, step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        finally:
            p.module.requires_grad_(False)
        return {"loss": float(loss.detach()), **{k: float(v) for k, v in stats.items()}, "lr": lr}


def heads_state(player: Player) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in player.module.state_dict().items()}


def reconstruct(loss: DecoderLoss, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    enc = loss.rae.encoder
    return net(enc(x)) * enc.image_std + enc.image_mean


#################################################################################
#                              Generator loss                                   #
#################################################################################


def test_l1_term_is_the_mean_absolute_error():
    loss, player, net = build(perceptual="none", discriminator="none")
    x = images()
    assert player is None
    with torch.no_grad():
        expected = (reconstruct(loss, net, x) - x).abs().mean(dim=(1, 2, 3))
    out = loss(net, x, None, step=10**6)
    assert out.shape == (4,)
    torch.testing.assert_close(out, expected)
    assert set(loss.last_stats) == {"l1"}


@pytest.mark.parametrize("dist", ["uniform", "halfnormal"])
def test_noise_augmentation_is_the_rae_s(dist):
    """Same noise as RAE.add_noise for the same RNG state: L1 of the noisy reconstruction of a train-mode RAE,
    whatever the loss module's own mode."""
    loss, _, net = build(noise_tau=0.8, noise_dist=dist, perceptual="none", discriminator="none")
    x = images()
    torch.manual_seed(3)
    out = loss(net, x)
    torch.manual_seed(3)
    with torch.no_grad():
        recon = RAE(loss.rae.encoder, net, noise_tau=0.8, noise_dist=dist).train()(x)
    torch.testing.assert_close(out.detach(), (recon - x).abs().mean(dim=(1, 2, 3)))
    torch.manual_seed(3)
    torch.testing.assert_close(loss.eval()(net, x).detach(), out.detach())
    clean, _, _ = build(net, perceptual="none", discriminator="none")
    assert not torch.allclose(out.detach(), clean(net, x).detach())


def test_encoder_perceptual_term_and_its_gradient():
    loss, _, net = build(discriminator="none", l1_weight=0.0)
    x = images()
    out = loss(net, x)
    enc = loss.rae.encoder
    a, b = F.normalize(enc(reconstruct(loss, net, x)), dim=-1), F.normalize(enc(x), dim=-1)
    torch.testing.assert_close(out, (a - b).pow(2).sum(-1).mean(-1), rtol=1e-4, atol=1e-6)
    out.mean().backward()
    assert net.decoder_pred.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.parameters())
    assert float(loss.perceptual(x, x).abs().max()) < 1e-6


def test_gan_term_and_discriminator_wait_for_their_start_steps():
    loss, player, net = build(gan_start_step=5, disc_start_step=3)
    plain, _, _ = build(net, discriminator="none")
    turns, x = Turns(player), images()
    assert player.name == "disc" and player.start_step == 3
    before = heads_state(player)
    for step in range(3):
        torch.testing.assert_close(loss(net, x, None, step), plain(net, x, None, step))
        assert "gan" not in loss.last_stats
        assert turns(net, x, step) == {}
    assert all(torch.equal(v, heads_state(player)[k]) for k, v in before.items())  # parameters and SN buffers

    stats = turns(net, x, 3)
    assert set(stats) == {"loss", "logits_real", "logits_fake", "lr"}
    after = heads_state(player)
    assert any(not torch.equal(before[k], after[k]) for k in before if "original" in k)
    assert "gan" not in loss.last_stats and torch.allclose(loss(net, x, None, 4), plain(net, x, None, 4))
    loss(net, x, None, 5)
    assert {"gan", "adaptive_weight"} <= set(loss.last_stats)


def test_generator_never_accumulates_into_the_discriminator():
    loss, player, net = build()
    loss(net, images(), None, 0).mean().backward()
    assert loss.discriminator.heads is player.module
    assert all(p.grad is None for p in player.module.parameters())
    assert all(not p.requires_grad for p in player.module.parameters())  # frozen outside its turns


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    loss, _, net = build(diffaug=False, perceptual_weight=0.5, gan_weight=0.75)
    # eval(): spectral norm stops its power iteration, so the independent discriminator calls see the same weights.
    loss.eval()
    x = images()
    W = net.decoder_pred.weight
    out = loss(net, x, None, 0)
    lam = loss.last_stats["adaptive_weight"]

    recon = reconstruct(loss, net, x)
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

    clamped, _, _ = build(net, diffaug=False, max_adaptive_weight=1e-3)
    clamped.eval().discriminator.load_state_dict(loss.discriminator.state_dict())
    clamped(net, x, None, 0)
    assert float(clamped.last_stats["adaptive_weight"]) == pytest.approx(min(1e-3, float(expected)))


def test_the_loss_only_calls_a_wrapped_decoder():
    """DDP-like (`.module`) or any other wrapper: the last layer was given at construction, the net is only called."""

    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, tokens):
            return self.module(tokens)

    loss, _, net = build(diffaug=False)
    loss.eval()
    x = images()
    torch.testing.assert_close(loss(Wrapper(net), x), loss(net, x))
    torch.testing.assert_close(loss(nn.Sequential(net), x), loss(net, x))
    assert loss.last_layer is net.decoder_pred.weight
    assert not any(p is net.decoder_pred.weight for p in loss.parameters())  # not the loss's own parameter


def test_no_grad_call_leaves_out_the_gan_term():
    loss, _, net = build()
    with torch.no_grad():
        out = loss(net, images(), None, 0)
    assert out.shape == (4,) and "gan" not in loss.last_stats


#################################################################################
#                           The discriminator player                            #
#################################################################################


def test_player_loss_is_the_hinge_loss_on_quantised_clean_reconstructions():
    loss, player, net = build(noise_tau=0.8, diffaug=False)
    x = images()
    player.module.eval()  # no power iteration: the two evaluations below see the same weights
    torch.manual_seed(4)
    got, stats = player.loss(net, x, 0)
    with torch.no_grad():
        fake = quantize_8bit(reconstruct(loss, net, x) * 2 - 1)  # un-noised tokens although noise_tau > 0
        logits_real, logits_fake = loss.discriminator(torch.cat([x * 2 - 1, fake])).chunk(2)
    torch.testing.assert_close(got, hinge_d_loss(logits_real, logits_fake))
    torch.testing.assert_close(stats["logits_real"], logits_real.mean())
    torch.testing.assert_close(stats["logits_fake"], logits_fake.mean())
    assert got.requires_grad is False  # heads frozen outside a turn: nothing to train here


def test_player_turns_lower_the_hinge_loss_on_a_fixed_batch():
    _, player, net = build(diffaug=False, disc_lr=2e-3, disc_betas=(0.5, 0.9), disc_weight_decay=0.01,
                           lr_factor=lambda step: 0.5)
    assert (player.optim.lr, player.optim.betas, player.optim.weight_decay, player.optim.eps) == (2e-3, (0.5, 0.9), 0.01, 1e-8)
    turns, x = Turns(player), images()
    results = [turns(net, x, step) for step in range(12)]
    losses = [r["loss"] for r in results]
    assert losses[-1] < losses[0] - 0.1, losses
    assert results[0]["lr"] == pytest.approx(1e-3)
    assert all(p.grad is not None for p in player.module.parameters())  # the turn's gradients reached the heads
    assert all(p.grad is None for p in net.parameters())  # and nothing reached the decoder


def test_player_module_holds_the_trainable_heads_only():
    loss, player, net = build()
    heads = player.module
    state = heads.state_dict()
    assert all(k.split(".")[0].isdigit() for k in state)  # head i's tensors, nothing frozen
    assert not any("encoder" in k or "features" in k for k in state)
    assert sum(v.numel() for v in state.values()) == (
        sum(p.numel() for p in heads.parameters()) + sum(b.numel() for b in heads.buffers())
    )
    assert set(map(id, heads.parameters())) == set(map(id, loss.discriminator.heads.parameters()))
    assert all(not p.requires_grad for p in loss.discriminator.features.parameters())
    assert build(discriminator="none")[1] is None


def test_a_restored_player_repeats_its_turns(tmp_path):
    """Heads + optimizer state are all a player needs to resume (what the engine checkpoints)."""
    loss, player, net = build()
    turns, x = Turns(player), images()
    for step in range(2):
        turns(net, x, step)
    torch.save({"module": player.module.state_dict(), "optimizer": turns.optimizer.state_dict()}, tmp_path / "p.pt")
    state = torch.load(tmp_path / "p.pt", weights_only=True)
    assert state["optimizer"]["state"]  # Adam moments exist after two turns

    torch.manual_seed(123)  # differently initialised fresh heads
    fresh_loss, fresh, _ = build(net)
    assert not all(torch.equal(v, heads_state(fresh)[k]) for k, v in heads_state(player).items())
    fresh_turns = Turns(fresh)
    fresh.module.load_state_dict(state["module"])
    fresh_turns.optimizer.load_state_dict(state["optimizer"])
    torch.manual_seed(7)
    a = turns(net, x, 2)
    torch.manual_seed(7)
    assert fresh_turns(net, x, 2) == a
    for k, v in heads_state(player).items():
        assert torch.equal(v, heads_state(fresh)[k]), k
    torch.manual_seed(8)
    ga = loss(net, x, None, 3)
    torch.manual_seed(8)
    assert torch.equal(ga, fresh_loss(net, x, None, 3))


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


def test_augmenter_is_diffaugment_or_the_identity():
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    assert torch.equal(augmenter(False)(x), x)
    torch.manual_seed(2)
    a = augmenter(True, prob=0.5, translation=0.25)(x)
    torch.manual_seed(2)
    torch.testing.assert_close(a, diff_augment(x, prob=0.5, translation=0.25))


#################################################################################
#                           Hugging Face DINOv2 encoder                          #
#################################################################################


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    """A 4-block DINOv2 with registers, saved as a local Hugging Face folder (no download)."""
    from transformers import Dinov2WithRegistersConfig as Config, Dinov2WithRegistersModel as Model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dinov2")
    Model(Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, patch_size=4,
                 image_size=32, num_register_tokens=4)).save_pretrained(folder)
    return folder


def test_dinov2_encoder_exposes_intermediate_maps(tiny_dinov2):
    encoder = build_encoder("dinov2", path=tiny_dinov2, input_size=16)
    assert encoder.num_blocks == 4 and TinyEncoder().num_blocks is None
    assert default_key_depths(12) == (2, 5, 8, 11) and default_key_depths(4) == (0, 1, 2, 3)
    x = images(2, 20)  # resized to the encoder's 16 px by the encoder itself
    maps = encoder.feature_maps(x, (1, 3))
    pixels = (F.interpolate(x, size=(16, 16), mode="bicubic", align_corners=False) - encoder.image_mean) / encoder.image_std
    hidden = encoder.model(pixel_values=pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(maps[0], encoder(x))
    torch.testing.assert_close(maps[1], hidden[2][:, 5:])
    torch.testing.assert_close(maps[2], hidden[4][:, 5:])
    for a, b in zip(EncoderFeatureMaps(encoder, (1, 3))(x), maps):
        assert torch.equal(a, b)
    assert torch.equal(encoder.feature_maps(x)[0], encoder(x))
    with pytest.raises(ValueError, match="outside"):
        encoder.feature_maps(x, (4,))
    with pytest.raises(ValueError, match="final tokens"):
        TinyEncoder().feature_maps(x, (0,))
    with pytest.raises(ConfigError, match="outside"):
        EncoderFeatureMaps(encoder, (4,))
    with pytest.raises(ConfigError, match="final tokens"):
        EncoderFeatureMaps(TinyEncoder(), (0,))

    x = images(2)
    loss, player, net = build(tiny_decoder(32), encoder)
    assert len(player.module) == 5  # final + blocks 0..3
    assert loss.perceptual.maps.depths == (0, 1, 2)  # the last block is the final map already
    out = loss(net, x, None, 0)
    assert out.shape == (2,) and torch.isfinite(out).all() and "adaptive_weight" in loss.last_stats
    assert loss.discriminator(x * 2 - 1).shape == (2, 5 * 16)
    assert math.isfinite(Turns(player)(net, x, 0)["loss"])
    assert not any("model." in k for k in player.module.state_dict())


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
    LPIPS.from_spec([tmp_path / "vgg16-397923af.pth", tmp_path / "vgg.pth"])

    loss, player, net = build(perceptual="lpips", lpips_weights=str(tmp_path), discriminator="none")
    assert isinstance(loss.perceptual, LPIPS) and player is None
    out = loss(net, a)
    out.mean().backward()
    assert torch.isfinite(out).all() and "perceptual" in loss.last_stats
    assert all(not p.requires_grad and p.grad is None for p in loss.perceptual.parameters())


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
        DecoderObjectiveOptions(perceptual="lpips")


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

    loss, player, net = build(discriminator="dino", dino_weights=str(path))
    assert len(player.module) == 5
    out = loss(net, images())  # 16 px reconstructions are resized to the ViT's 32 px
    out.mean().backward()
    assert torch.isfinite(out).all() and "adaptive_weight" in loss.last_stats
    assert math.isfinite(Turns(player)(net, images(), 0)["loss"])
    keys = player.module.state_dict()
    assert keys and not any(k.startswith(("vit", "blocks", "features")) for k in keys)
    assert all(not p.requires_grad and p.grad is None for p in loss.discriminator.features.parameters())


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
        DecoderObjectiveOptions(discriminator="dino")
    _save_tiny_dino(path)
    with pytest.raises(ConfigError, match="outside"):
        build(discriminator="dino", dino_weights=str(path), disc_layers=(12,))


#################################################################################
#                                  Options                                      #
#################################################################################


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(perceptual="vgg"), "perceptual"),
        (dict(discriminator="stylegan"), "discriminator"),
        (dict(gan_weight=-1.0), "gan_weight"),
        (dict(disc_lr=float("nan")), "disc_lr"),
        (dict(diffaug_prob=2.0), "diffaug_prob"),
        (dict(disc_kernel_size=4), "disc_kernel_size"),
    ],
)
def test_bad_options_are_named(options, match):
    with pytest.raises(ConfigError, match=match):
        DecoderObjectiveOptions(**options)
    with pytest.raises(ConfigError, match=f"objective.*{match}"):
        from_dict(DecoderObjectiveOptions, options, "objective")


def test_options_read_from_a_config_section():
    options = from_dict(DecoderObjectiveOptions, {"disc_betas": [0.5, 0.99], "disc_layers": [1, 3], "gan_weight": 1,
                                                  "lpips_weights": ["a.pth", "b.pth"]}, "objective")
    assert options.disc_betas == (0.5, 0.99) and options.disc_layers == (1, 3) and options.gan_weight == 1.0
    assert options.lpips_weights == ["a.pth", "b.pth"]
    # The token noise is the RAE's (rae.noise_tau / rae.noise_dist), not an objective option.
    with pytest.raises(ConfigError, match="objective.noise_tau"):
        from_dict(DecoderObjectiveOptions, {"noise_tau": 0.8}, "objective")
    with pytest.raises(ValueError, match="noise_dist"):
        RAE(TinyEncoder(), noise_dist="gauss")
    with pytest.raises(ValueError, match="noise_tau"):
        RAE(TinyEncoder(), noise_tau=float("nan"))


#################################################################################
#                                 Training                                      #
#################################################################################


def test_training_reduces_the_reconstruction_error():
    loss, player, net = build(tiny_decoder(randomize=False), noise_tau=0.8, gan_start_step=10, disc_start_step=5)
    turns, x = Turns(player), images(4)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)

    def l1() -> float:
        with torch.no_grad():
            return float((RAE(loss.rae.encoder, net).eval()(x) - x).abs().mean())

    start = l1()
    for step in range(20):
        out = loss(net, x, None, step).mean()
        opt.zero_grad(set_to_none=True)
        out.backward()
        opt.step()
        stats = turns(net, x, step)
        assert (stats != {}) == (step >= 5)
    assert "gan" in loss.last_stats
    assert l1() < 0.8 * start


#################################################################################
#                          torch.distributed (slow)                             #
#################################################################################


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from mfrae.distributed import DistInfo, average_gradients, broadcast_module

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        info = DistInfo(rank=rank, world_size=world)
        torch.manual_seed(0)
        net = tiny_decoder()
        torch.manual_seed(100 + rank)  # ranks build different heads: rank 0's must win
        loss, player, _ = build(net, diffaug=False)
        broadcast_module(player.module, info)  # what the engine does when training starts
        x = images(4)[2 * rank : 2 * rank + 2]
        ddp = DistributedDataParallel(net)
        out = loss(ddp, x, None, 0).mean()
        out.backward()  # DDP averages the decoder gradients; autograd.grad for lambda did not disturb it
        turns = Turns(player)
        player.module.requires_grad_(True)  # one engine turn, with its gradient average
        disc_loss, _ = player.loss(net, x, 0)
        disc_loss.backward()
        average_gradients(list(player.module.parameters()), info)
        turns.optimizer.step()
        player.module.requires_grad_(False)
        disc_grads = [p.grad for p in player.module.parameters()]
        result = {"heads": heads_state(player), "disc_grads": disc_grads, "grad": net.decoder_pred.weight.grad}
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
    loss, player, _ = build(net, diffaug=False)
    loss(net, images(4)[:2], None, 0)  # the same power iteration as the ranks' generator pass
    Turns(player)(net, images(4), 0)
    for g, g0 in zip((p.grad for p in player.module.parameters()), r0["disc_grads"]):
        torch.testing.assert_close(g, g0, rtol=1e-4, atol=1e-7)
    for k, v in heads_state(player).items():  # Adam's first step is about +-lr wherever |grad| >> eps
        torch.testing.assert_close(v, r0["heads"][k], rtol=0, atol=1e-4)
