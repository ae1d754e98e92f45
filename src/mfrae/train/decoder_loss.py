"""The decoder stage's generator loss: training the RAE pixel decoder (RAE, arXiv 2510.11690).

Per sample, for images x in [0, 1]:

    z~     = E(x) + sigma n                        the RAE's noise augmentation (`RAE.encode_tokens(x, noise=True)`)
    x^     = D(z~) * image_std + image_mean        reconstruction in [0, 1] (not clamped, `RAE.to_pixels`)
    L_rec  = w_1 * mean|x^ - x|  +  w_P * P(x^, x)
    L_G    = -mean D_disc(A(2 x^ - 1))             A = the augmentation; only once step >= gan_start_step
    L      = L_rec + w_G * lambda * L_G
    lambda = clamp(||grad_W mean L_rec|| / (||grad_W mean L_G|| + 1e-6), 0, max_adaptive_weight), detached

with W the decoder's last layer (the adaptive weight of VQGAN, Esser et al., arXiv 2012.09841). The
discriminator's own loss is `mfrae.train.gan`; options and construction are `mfrae.train.decoder_parts`;
the reference recipe and mfrae's choices are in docs/rae.md.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from mfrae.distributed import WHOLE_BATCH, BatchPart
from mfrae.models.rae import RAE

#################################################################################
#                                 Equations                                     #
#################################################################################


def l1_per_sample(recon: Tensor, x: Tensor) -> Tensor:
    """mean |x^ - x| per sample: the pixel term of L_rec."""
    return (recon - x).abs().flatten(1).mean(dim=1)


def generator_gan_loss(logits: Tensor) -> Tensor:
    """L_G = -mean D(.), spread per sample (its batch mean is the mean over every logit): the decoder raises the
    discriminator's score of its reconstructions."""
    return -logits.flatten(1).mean(dim=1)


def adaptive_weight(rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """lambda = ||grad_W rec_loss|| / (||grad_W gan_loss|| + 1e-6), clamped to [0, max_weight] and detached:
    balances the two gradients where they meet, at the decoder's last layer.

    Uses `torch.autograd.grad` (graph retained), so it accumulates nothing into `.grad` and does not fire the
    gradient hooks of DistributedDataParallel.
    """
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = rec_grad.norm() / (gan_grad.norm() + 1e-6)
    return weight.clamp(0.0, max_weight).detach()


#################################################################################
#                                 The loss                                      #
#################################################################################


class DecoderLoss(nn.Module):
    """The objective `loss(net, x, y, step) -> per-sample losses [B]` of the decoder stage (labels unused).

    Args:
        rae: the RAE whose encoder (frozen) and noise settings (`noise_tau`, `noise_dist`) the decoder trains with.
        last_layer: the decoder's last weight W (`decoder_pred.weight`) for the adaptive weight; the same tensor
            the trained network uses, not a copy.
        perceptual: `P(recon, target) -> [B]` (`EncoderPerceptual`, `LPIPS`) or None.
        discriminator: images in [-1, 1] -> logits [B, L] (`TokenDiscriminator`) or None (no GAN term).
        augment: applied to the discriminator's input (DiffAugment), or None.
        l1_weight, perceptual_weight, gan_weight: w_1, w_P, w_G.
        gan_start_step: first step whose loss has the GAN term.
        max_adaptive_weight: upper clamp of lambda.

    `net` may be wrapped (DDP, torch.compile): it is only ever called, `net(tokens)`. Under `torch.no_grad()` the
    adaptive weight cannot be measured, so the GAN term is left out there. `last_stats` holds detached scalars
    of the last call: l1, perceptual, gan, adaptive_weight (those that were computed).
    """

    def __init__(
        self,
        rae: RAE,
        last_layer: Tensor,
        *,
        perceptual: nn.Module | None = None,
        discriminator: nn.Module | None = None,
        augment: Callable[[Tensor], Tensor] | None = None,
        l1_weight: float = 1.0, perceptual_weight: float = 1.0, gan_weight: float = 0.75,
        gan_start_step: int = 20_016, max_adaptive_weight: float = 1e4,
    ):
        super().__init__()
        if rae.encoder is None:
            raise ValueError("DecoderLoss needs an RAE with an encoder")
        self.rae = rae
        self.perceptual = perceptual
        self.discriminator = discriminator
        # A plain attribute, not a registered parameter: the weight belongs to the decoder and its optimizer.
        object.__setattr__(self, "last_layer", last_layer)
        self.augment = augment if augment is not None else (lambda x: x)
        self.l1_weight, self.perceptual_weight = float(l1_weight), float(perceptual_weight)
        self.gan_weight, self.gan_start_step = float(gan_weight), int(gan_start_step)
        self.max_adaptive_weight = float(max_adaptive_weight)
        self.last_stats: dict[str, Tensor] = {}

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and self.gan_weight > 0 and step >= self.gan_start_step

    def forward(self, net: nn.Module, x: Tensor, y: Tensor | None = None, step: int = 0,
                part: BatchPart = WHOLE_BATCH) -> Tensor:
        recon = self.rae.to_pixels(net(self.rae.encode_tokens(x, noise=True)))
        l1 = l1_per_sample(recon, x)
        rec = self.l1_weight * l1
        stats = {"l1": l1.detach().mean()}
        if self.perceptual is not None and self.perceptual_weight > 0:
            p = self.perceptual(recon, x)
            rec = rec + self.perceptual_weight * p
            stats["perceptual"] = p.detach().mean()
        total = rec
        if self.gan_active(step) and torch.is_grad_enabled():
            gan = generator_gan_loss(self.discriminator(self.augment(recon * 2 - 1)))
            weight = adaptive_weight(rec.mean(), gan.mean(), self.last_layer, self.max_adaptive_weight)
            total = total + self.gan_weight * weight * gan
            stats.update(gan=gan.detach().mean(), adaptive_weight=weight)
        self.last_stats = stats
        return total
