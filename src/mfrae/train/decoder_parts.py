"""The decoder stage's objective section and its builder: generator loss + discriminator player.

`DecoderObjectiveOptions` is the `objective` section of a decoder-stage config (read with
`mfrae.config.from_dict`); `build_decoder_objective` turns it, the RAE (encoder and noise settings) and the
decoder into the generator loss (`DecoderLoss`) and the players the engine trains in turns with the decoder
(the discriminator, `mfrae.train.gan`). Defaults follow the released RAE recipe, with mfrae's substitutions
for the weight files it cannot assume (docs/rae.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

from torch import nn

from mfrae.errors import ConfigError
from mfrae.models.discriminator import DINO_KEY_DEPTHS, DinoDiscFeatures, DinoViT, EncoderDiscFeatures, TokenDiscriminator
from mfrae.models.encoders import RepresentationEncoder
from mfrae.models.perceptual import LPIPS, LPIPS_LIN_FILE, VGG16_FILE, EncoderFeatureMaps, EncoderPerceptual
from mfrae.models.rae import RAE
from mfrae.models.vit_decoder import ViTDecoder
from mfrae.train.augment import augmenter
from mfrae.train.decoder_loss import DecoderLoss
from mfrae.train.gan import discriminator_player
from mfrae.train.parts import Player, PlayerOptim

PERCEPTUAL_KINDS = ("encoder", "lpips", "none")
DISCRIMINATOR_KINDS = ("encoder", "dino", "none")

#################################################################################
#                                  Options                                      #
#################################################################################


@dataclass
class DecoderObjectiveOptions:
    """The decoder stage's `objective` section (token noise comes from the `rae` section: rae.noise_tau / noise_dist).

    l1_weight, perceptual_weight, gan_weight: w_1, w_P, w_G of the generator loss.
    perceptual: "encoder" (the frozen encoder's features), "lpips" (needs `lpips_weights`: a folder with
        vgg16-397923af.pth and vgg.pth, or "VGG_FILE,LIN_FILE"), or "none".
    discriminator: "encoder" (heads on the frozen encoder), "dino" (needs `dino_weights`, a timm-layout
        dino_vit_small_patch8_224.pth), or "none" (no GAN at all).
    gan_start_step: first step whose generator loss has the GAN term (default: epoch 8 of ImageNet at global
        batch 512, 2502 steps per epoch). disc_start_step: first step of the discriminator's turns (epoch 6).
    max_adaptive_weight: upper clamp of the adaptive weight lambda.
    disc_lr, disc_betas, disc_weight_decay: AdamW of the discriminator heads (eps 1e-8); the learning rate
        follows the decoder's schedule.
    diffaug, diffaug_prob, diffaug_translation: DiffAugment on every discriminator input.
    disc_layers: intermediate blocks feeding extra heads; default (2, 5, 8, 11) for "dino" and the quarter
        blocks of the encoder for "encoder" when it exposes them (else the final tokens only).
    disc_kernel_size: kernel of the circular residual convolution of each head (odd).
    perceptual_layers: intermediate encoder blocks of the "encoder" perceptual term; default the quarter
        blocks except the last (whose normalised output is already the final tokens).
    """

    l1_weight: float = 1.0
    perceptual: Literal["encoder", "lpips", "none"] = "encoder"
    perceptual_weight: float = 1.0
    lpips_weights: str | list[str] | None = None
    discriminator: Literal["encoder", "dino", "none"] = "encoder"
    dino_weights: str | None = None
    gan_weight: float = 0.75
    gan_start_step: int = 20_016
    disc_start_step: int = 15_012
    max_adaptive_weight: float = 1e4
    disc_lr: float = 2e-4
    disc_betas: tuple[float, float] = (0.9, 0.95)
    disc_weight_decay: float = 0.0
    diffaug: bool = True
    diffaug_prob: float = 1.0
    diffaug_translation: float = 0.125
    disc_layers: tuple[int, ...] | None = None
    disc_kernel_size: int = 9
    perceptual_layers: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.perceptual not in PERCEPTUAL_KINDS:
            raise ConfigError(f"perceptual must be one of {PERCEPTUAL_KINDS}, got {self.perceptual!r}")
        if self.discriminator not in DISCRIMINATOR_KINDS:
            raise ConfigError(f"discriminator must be one of {DISCRIMINATOR_KINDS}, got {self.discriminator!r}")
        for name in ("l1_weight", "perceptual_weight", "gan_weight", "max_adaptive_weight", "disc_lr",
                     "gan_start_step", "disc_start_step"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0 <= self.diffaug_prob <= 1:
            raise ConfigError(f"diffaug_prob must be in [0, 1], got {self.diffaug_prob}")
        if self.disc_kernel_size % 2 == 0:
            raise ConfigError(f"disc_kernel_size must be odd, got {self.disc_kernel_size}")
        if self.perceptual == "lpips" and not self.lpips_weights:
            raise ConfigError(f"perceptual='lpips' needs lpips_weights: a folder with {VGG16_FILE} and {LPIPS_LIN_FILE}")
        if self.discriminator == "dino" and not self.dino_weights:
            raise ConfigError("discriminator='dino' needs dino_weights: a local dino_vit_small_patch8_224.pth")


#################################################################################
#                                  Builder                                      #
#################################################################################


def default_key_depths(num_layers: int) -> tuple[int, ...]:
    """Blocks at the ends of the four quarters of the network: (2, 5, 8, 11) for 12 blocks, as DINO's key depths."""
    return tuple(sorted({max(0, (k + 1) * num_layers // 4 - 1) for k in range(4)}))


def _perceptual(options: DecoderObjectiveOptions, encoder: RepresentationEncoder) -> nn.Module | None:
    if options.perceptual == "encoder":
        depth = encoder.num_blocks
        # The last block's output is the final tokens before their LayerNorm: counted once, as the final map.
        default = tuple(d for d in default_key_depths(depth) if d != depth - 1) if depth else ()
        layers = options.perceptual_layers if options.perceptual_layers is not None else default
        return EncoderPerceptual(EncoderFeatureMaps(encoder, layers))
    if options.perceptual == "lpips":
        return LPIPS.from_spec(options.lpips_weights)
    return None


def _discriminator(options: DecoderObjectiveOptions, encoder: RepresentationEncoder) -> TokenDiscriminator | None:
    if options.discriminator == "encoder":
        depth = encoder.num_blocks
        default = default_key_depths(depth) if depth else ()
        layers = options.disc_layers if options.disc_layers is not None else default
        features = EncoderDiscFeatures(EncoderFeatureMaps(encoder, layers))
        return TokenDiscriminator(features, encoder.hidden_size, options.disc_kernel_size)
    if options.discriminator == "dino":
        vit = DinoViT.from_file(options.dino_weights)
        layers = options.disc_layers if options.disc_layers is not None else DINO_KEY_DEPTHS
        return TokenDiscriminator(DinoDiscFeatures(vit, layers), vit.dim, options.disc_kernel_size)
    return None


def build_decoder_objective(
    options: DecoderObjectiveOptions,
    rae: RAE,
    net: ViTDecoder,
    lr_factor: Callable[[int], float] | None = None,
) -> tuple[DecoderLoss, list[Player]]:
    """(generator loss, [discriminator player] or [] when discriminator == "none") for decoder `net` (unwrapped).

    `lr_factor(step)` scales `disc_lr` (the decoder's schedule over its peak rate). The perceptual network is
    built before the discriminator heads, so a seeded run draws their initial weights in a fixed order.
    """
    if rae.encoder is None:
        raise ConfigError("the decoder stage needs an RAE with an encoder")
    perceptual = _perceptual(options, rae.encoder)
    discriminator = _discriminator(options, rae.encoder)
    augment = augmenter(bool(options.diffaug), float(options.diffaug_prob), float(options.diffaug_translation))
    loss = DecoderLoss(
        rae, net.decoder_pred.weight, perceptual=perceptual, discriminator=discriminator, augment=augment,
        l1_weight=options.l1_weight, perceptual_weight=options.perceptual_weight, gan_weight=options.gan_weight,
        gan_start_step=options.gan_start_step, max_adaptive_weight=options.max_adaptive_weight,
    )
    if discriminator is None:
        return loss, []
    optim = PlayerOptim(lr=float(options.disc_lr), betas=tuple(options.disc_betas),
                        weight_decay=float(options.disc_weight_decay))
    player = discriminator_player(discriminator, rae, augment, optim, options.disc_start_step, lr_factor)
    return loss, [player]
