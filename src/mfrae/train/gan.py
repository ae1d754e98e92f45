"""The decoder stage's second player: the discriminator, trained in turns with the decoder by the engine.

Hinge loss (Lim & Ye, arXiv 1705.02894) on real images and on the decoder's current reconstructions, as in the
RAE decoder recipe (arXiv 2510.11690; reference details in docs/rae.md):

    L_D  = 0.5 * (mean relu(1 - D(A(real))) + mean relu(1 + D(A(fake))))
    real = 2 x - 1,   fake = q(2 D_dec(E(x)) - 1),   q = `quantize_8bit`,   A = DiffAugment (independent draws)

The fakes are a fresh no-grad reconstruction from un-noised tokens, after the decoder's update. This module
only defines the loss and packs it as a `mfrae.train.parts.Player`; the engine owns the optimizer, the
learning rate, the trainable / frozen toggling, the gradient average over processes, the rank-0 broadcast
and the checkpoint entry.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mfrae.models.discriminator import TokenDiscriminator
from mfrae.models.rae import RAE
from mfrae.train.parts import Player, PlayerOptim

PLAYER_NAME = "disc"  # logged as disc_loss, disc_logits_real, disc_logits_fake, disc_lr

#################################################################################
#                                 Equations                                     #
#################################################################################


def quantize_8bit(x: Tensor) -> Tensor:
    """Clamp images in [-1, 1] and snap them to the 256 levels of an 8-bit image: round((x + 1) 127.5) / 127.5 - 1.
    Real images are 8-bit, so the fakes are too: the discriminator cannot win on sub-level noise."""
    return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake))): no push beyond a margin of 1 on either side."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


#################################################################################
#                                The player                                     #
#################################################################################


class DiscriminatorLoss:
    """The player's loss: `loss(net, x, step) -> (L_D, {"logits_real": mean, "logits_fake": mean})` for images
    x [B, 3, H, W] in [0, 1]; `net` is the (unwrapped) decoder, `rae` supplies the encoder and the pixel space."""

    def __init__(self, discriminator: TokenDiscriminator, rae: RAE, augment: Callable[[Tensor], Tensor] | None = None):
        self.discriminator = discriminator
        self.rae = rae
        self.augment = augment if augment is not None else (lambda x: x)

    @torch.no_grad()
    def fake_images(self, net: nn.Module, x: Tensor) -> Tensor:
        """q(2 D_dec(E(x)) - 1): the quantised reconstruction in [-1, 1] from un-noised tokens."""
        return quantize_8bit(self.rae.to_pixels(net(self.rae.encode_tokens(x, noise=False))) * 2 - 1)

    def logits(self, net: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits on the augmented reals, logits on the augmented fakes), one forward over both halves
        (the heads normalise per sample, so the halves do not mix)."""
        fake = self.fake_images(net, x)
        with torch.no_grad():
            both = torch.cat([self.augment(x * 2 - 1), self.augment(fake)])
        logits_real, logits_fake = self.discriminator(both).chunk(2)
        return logits_real, logits_fake

    def __call__(self, net: nn.Module, x: Tensor, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        logits_real, logits_fake = self.logits(net, x)
        stats = {"logits_real": logits_real.detach().mean(), "logits_fake": logits_fake.detach().mean()}
        return hinge_d_loss(logits_real, logits_fake), stats


def discriminator_player(
    discriminator: TokenDiscriminator,
    rae: RAE,
    augment: Callable[[Tensor], Tensor] | None,
    optim: PlayerOptim,
    start_step: int = 0,
    lr_factor: Callable[[int], float] | None = None,
) -> Player:
    """The discriminator as a `Player` named "disc": its trainable module is `discriminator.heads` (the frozen
    feature network is neither trained nor checkpointed). The heads are frozen here; the engine makes them
    trainable during their own turn only, so the generator loss never accumulates into them."""
    discriminator.heads.requires_grad_(False)
    return Player(PLAYER_NAME, discriminator.heads, DiscriminatorLoss(discriminator, rae, augment), optim,
                  start_step=start_step, lr_factor=lr_factor)
