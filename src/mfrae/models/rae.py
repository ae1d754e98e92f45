"""Representation Autoencoder (RAE, arXiv 2510.11690): a frozen representation encoder, per-element latent
normalisation, and a trainable ViT pixel decoder.

    encode:  x in [0, 1] -> tokens = E(x) [+ sigma n in training] -> grid [C, g, g] -> (z - mean) / sqrt(var + eps)
    decode:  z -> z sqrt(var + eps) + mean -> tokens -> D(tokens) * image_std + image_mean   (not clamped)

Noise augmentation (the noise-augmented decoder training of RAE): in training mode with tau > 0, the raw
tokens get sigma * n, n ~ N(0, I), with sigma drawn per sample; `noise_dist="uniform"` draws sigma = tau U[0, 1)
(the official code), `"halfnormal"` draws sigma = |N(0, tau^2)| (the paper); see docs/rae.md. In eval mode no
noise is added. `add_noise` is the one place the noise is drawn (the decoder's training loss uses it too).

The encoder is frozen and excluded from `state_dict()`: checkpoints hold the decoder and the statistics only.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from mfrae.errors import CheckpointError
from mfrae.models import diffusers_format as hf
from mfrae.models.encoders import IMAGENET_MEAN, IMAGENET_STD, RepresentationEncoder, grid_to_tokens, tokens_to_grid
from mfrae.models.vit_decoder import ViTDecoder

NOISE_DISTRIBUTIONS = ("uniform", "halfnormal")


def noise_tokens(tokens: Tensor, tau: float, dist: str = "uniform") -> Tensor:
    """z + sigma n, n ~ N(0, I), one sigma per sample: tau U[0, 1) ("uniform") or |N(0, tau^2)| ("halfnormal")."""
    if dist not in NOISE_DISTRIBUTIONS:
        raise ValueError(f"noise_dist must be one of {NOISE_DISTRIBUTIONS}, got {dist!r}")
    shape = (tokens.shape[0],) + (1,) * (tokens.dim() - 1)
    if dist == "uniform":
        sigma = tau * torch.rand(shape, device=tokens.device, dtype=tokens.dtype)
    else:
        sigma = (tau * torch.randn(shape, device=tokens.device, dtype=tokens.dtype)).abs()
    return tokens + sigma * torch.randn_like(tokens)


class LatentStats(nn.Module):
    """Per-element latent statistics {mean, var} of shape [C, g, g]: z_norm = (z - mean) / sqrt(var + eps).

    `encoder_name` / `encoder_fingerprint` name the encoder whose latents they describe (None: unknown, as for
    the authors' `stat.pt`), `source` the file they were read from; an RAE refuses them with another encoder.
    """

    def __init__(
        self, mean: Tensor, var: Tensor, eps: float = 1e-5, encoder_name: str | None = None,
        encoder_fingerprint: str | None = None, source: str | None = None,
    ):
        super().__init__()
        if mean.shape != var.shape or mean.dim() != 3:
            raise ValueError(f"latent stats need mean and var of one shape [C, H, W], got {tuple(mean.shape)} and {tuple(var.shape)}")
        if (var < 0).any():
            raise ValueError("latent stats hold a negative variance")
        self.eps = eps
        self.encoder_name, self.encoder_fingerprint, self.source = encoder_name, encoder_fingerprint, source
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("var", var.float().clone())

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.mean.shape)

    def normalize(self, z: Tensor) -> Tensor:
        return (z - self.mean) / torch.sqrt(self.var + self.eps)

    def denormalize(self, z: Tensor) -> Tensor:
        return z * torch.sqrt(self.var + self.eps) + self.mean

    def to_dict(self) -> dict[str, Tensor]:
        """The official `stat.pt` layout."""
        return {"mean": self.mean.detach().cpu(), "var": self.var.detach().cpu()}

    def check_encoder(self, encoder: RepresentationEncoder) -> None:
        """CheckpointError naming the file and both encoders when these statistics belong to another encoder;
        statistics that name no encoder (the authors' `stat.pt`) are accepted as they are."""
        if self.encoder_fingerprint is None:
            return
        found = encoder.fingerprint()
        if found != self.encoder_fingerprint:
            raise CheckpointError(
                f"{self.source or 'latent statistics'}: computed with encoder {self.encoder_name!r} (fingerprint "
                f"{self.encoder_fingerprint}), but the RAE's encoder is {encoder.name!r} (fingerprint {found}); "
                "compute statistics for this encoder with `mfrae stats`"
            )


class DiffusersLatentStats(LatentStats):
    """The latent normalisation of diffusers' `AutoencoderRAE`: z_norm = (z - mean) / (std + 1e-5) * scaling_factor
    (not `stat.pt`'s sqrt(var + eps)). `var` holds the matching (std + 1e-5)^2 - eps for code that reads it."""

    def __init__(self, mean: Tensor, std: Tensor, scaling_factor: float = 1.0, source: str | None = None):
        scale = std.float() + hf.LATENT_STD_EPS
        super().__init__(mean, (scale.square() - 1e-5).clamp_min(0), eps=1e-5, source=source)
        self.scaling_factor = float(scaling_factor)
        self.register_buffer("std", std.float().clone())

    def normalize(self, z: Tensor) -> Tensor:
        return (z - self.mean) / (self.std + hf.LATENT_STD_EPS) * self.scaling_factor

    def denormalize(self, z: Tensor) -> Tensor:
        return z / self.scaling_factor * (self.std + hf.LATENT_STD_EPS) + self.mean


class RAE(nn.Module):
    """encoder=None builds a decode-only RAE (sampling needs no encoder weights); the decoder's pixel space is
    then un-normalised with `image_mean` / `image_std` (ImageNet's, as for DINOv2), otherwise with the encoder's."""

    def __init__(
        self,
        encoder: RepresentationEncoder | None,
        decoder: ViTDecoder | None = None,
        stats: LatentStats | None = None,
        noise_tau: float = 0.0,
        noise_dist: str = "uniform",
        image_mean: tuple[float, ...] = IMAGENET_MEAN,
        image_std: tuple[float, ...] = IMAGENET_STD,
    ):
        super().__init__()
        if encoder is None and decoder is None:
            raise ValueError("an RAE needs an encoder, a decoder or both")
        if encoder is not None and decoder is not None and decoder.config.encoder_hidden_size != encoder.hidden_size:
            raise ValueError(
                f"decoder expects {decoder.config.encoder_hidden_size}-d tokens but the encoder makes {encoder.hidden_size}-d ones"
            )
        if noise_dist not in NOISE_DISTRIBUTIONS:
            raise ValueError(f"noise_dist must be one of {NOISE_DISTRIBUTIONS}, got {noise_dist!r}")
        if not (math.isfinite(noise_tau) and noise_tau >= 0):
            raise ValueError(f"noise_tau must be a finite number >= 0, got {noise_tau}")
        self.encoder = encoder
        self.decoder = decoder
        self.stats = stats
        if stats is not None and encoder is not None:
            stats.check_encoder(encoder)  # same-shaped statistics of another encoder would pass the shape check
        if stats is not None and encoder is not None and stats.shape != self.latent_shape:
            raise ValueError(f"latent stats have shape {stats.shape}, the encoder makes latents of shape {self.latent_shape}")
        self.noise_tau = float(noise_tau)
        self.noise_dist = noise_dist
        if encoder is None:
            self.register_buffer("image_mean", torch.tensor(image_mean).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("image_std", torch.tensor(image_std).view(1, -1, 1, 1), persistent=False)
        else:
            self.image_mean, self.image_std = encoder.image_mean, encoder.image_std
        self._register_state_dict_hook(_drop_encoder_weights)
        self.register_load_state_dict_pre_hook(_keep_encoder_weights)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        if self.encoder is not None:
            return (self.encoder.hidden_size, self.encoder.grid_size, self.encoder.grid_size)
        if self.stats is not None:
            return self.stats.shape
        g = math.isqrt(self.decoder.config.num_patches)
        return (self.decoder.config.encoder_hidden_size, g, g)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.encoder is not None:
            self.encoder.train(False)
        return self

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.encoder is not None:  # keep the aliases of the encoder's buffers after .to()
            self.image_mean, self.image_std = self.encoder.image_mean, self.encoder.image_std
        return self

    def add_noise(self, tokens: Tensor) -> Tensor:
        return noise_tokens(tokens, self.noise_tau, self.noise_dist)

    def encode_tokens(self, images: Tensor, noise: bool | None = None) -> Tensor:
        """Raw encoder tokens [B, N, C] (no gradient to the encoder), noise-augmented when `noise` is True
        (default: in training mode) and noise_tau > 0."""
        if self.encoder is None:
            raise ValueError("this RAE has no encoder (built for decoding only)")
        with torch.no_grad():
            tokens = self.encoder(images)
        if (self.training if noise is None else noise) and self.noise_tau > 0:
            tokens = self.add_noise(tokens)
        return tokens

    def encode(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [0, 1] -> normalised latents [B, C, g, g]."""
        z = tokens_to_grid(self.encode_tokens(images))
        return self.stats.normalize(z) if self.stats is not None else z

    def to_pixels(self, decoder_output: Tensor) -> Tensor:
        """A decoder's output (the encoder's normalised pixel space) -> images in about [0, 1]; lets a caller
        run the decoder itself (e.g. wrapped by DDP) and still un-normalise as the RAE does."""
        return decoder_output * self.image_std + self.image_mean

    def decode_tokens(self, tokens: Tensor) -> Tensor:
        """Raw tokens [B, N, C] -> images [B, 3, H, W] (about [0, 1]; not clamped)."""
        if self.decoder is None:
            raise ValueError("this RAE has no decoder (built for encoding only)")
        return self.to_pixels(self.decoder(tokens))

    def decode(self, latents: Tensor) -> Tensor:
        """normalised latents [B, C, g, g] -> images [B, 3, H, W] (about [0, 1]; not clamped)."""
        channels = self.latent_shape[0]
        if latents.dim() != 4 or latents.shape[1] != channels:
            raise ValueError(f"RAE.decode expects latents [B, {channels}, g, g], got {tuple(latents.shape)}")
        z = self.stats.denormalize(latents) if self.stats is not None else latents
        return self.decode_tokens(grid_to_tokens(z))

    def forward(self, images: Tensor) -> Tensor:
        """Reconstruction D(E(x)) (noise-augmented in training mode)."""
        return self.decode_tokens(self.encode_tokens(images))

    # ------------------------------------------------------------------ diffusers AutoencoderRAE folders

    @classmethod
    def from_pretrained(cls, spec: str | Path, with_encoder: bool = True) -> "RAE":
        """An RAE from a diffusers `AutoencoderRAE` folder, Hub id or `hf://owner/name[@rev]` (e.g.
        `nyu-visionx/RAE-dinov2-wReg-base-ViTXL-n08`): encoder, decoder and latent statistics with diffusers'
        normalisation, every key checked. `with_encoder=False` skips the encoder's weights (decoding only)."""
        folder = hf.locate(spec)
        source = str(folder)
        config, state = hf.read_config(folder), hf.read_weights(folder)
        hf.check_keys(state, source)
        decoder = hf.decoder_from_state(config, state, source)
        encoder = hf.encoder_from_state(config, state, source) if with_encoder else None
        g = math.isqrt(decoder.config.num_patches)
        shape = (decoder.config.encoder_hidden_size, g, g)
        normalisation = hf.latent_normalisation(config, state, shape, source)
        stats = None if normalisation is None else DiffusersLatentStats(*normalisation, source=source)
        mean, std = hf.pixel_normalisation(config, state)
        return cls(encoder, decoder, stats, noise_tau=float(config.get("noise_tau", 0.0)),
                   image_mean=tuple(mean), image_std=tuple(std))

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write a folder that diffusers' `AutoencoderRAE.from_pretrained` loads and that encodes and decodes as
        this RAE does; ValueError for what diffusers cannot express (another encoder, decoder LayerNorm eps)."""
        if self.encoder is None or self.decoder is None:
            raise ValueError("save_pretrained needs an RAE with both its encoder and its decoder")
        fields = hf.encoder_fields(self.encoder)
        dec = self.decoder.config
        if dec.num_patches != self.encoder.num_tokens:
            raise ValueError(f"the decoder reads {dec.num_patches} tokens, the encoder makes {self.encoder.num_tokens}; "
                             "diffusers needs them equal")
        if dec.layer_norm_eps != 1e-12:
            raise ValueError(f"diffusers' RAE decoder uses LayerNorm eps 1e-12, this one {dec.layer_norm_eps}")
        mean, std, scaling = self._diffusers_latent_normalisation()
        config = {
            **fields,
            "decoder_hidden_size": dec.hidden_size, "decoder_num_hidden_layers": dec.num_layers,
            "decoder_num_attention_heads": dec.num_heads, "decoder_intermediate_size": dec.intermediate_size,
            "patch_size": dec.patch_size, "image_size": dec.image_size, "num_channels": dec.num_channels,
            "encoder_norm_mean": self.image_mean.flatten().tolist(),
            "encoder_norm_std": self.image_std.flatten().tolist(),
            "latents_mean": None if mean is None else mean.tolist(),
            "latents_std": None if std is None else std.tolist(),
            "noise_tau": self.noise_tau, "reshape_to_2d": True, "use_encoder_loss": False, "scaling_factor": scaling,
        }
        state = {"encoder." + k: v for k, v in self.encoder.model.state_dict().items()}
        state.update({"decoder." + hf.decoder_key_to_diffusers(k): v for k, v in self.decoder.state_dict().items()
                      if k not in ("decoder_pos_embed",)})
        state["encoder_mean"], state["encoder_std"] = self.image_mean.reshape(1, 3, 1, 1), self.image_std.reshape(1, 3, 1, 1)
        state["_latents_mean"] = mean if mean is not None else torch.zeros(1)
        state["_latents_std"] = std if std is not None else torch.ones(1)
        return hf.write_folder(directory, config, state)

    def _diffusers_latent_normalisation(self) -> tuple[Tensor | None, Tensor | None, float]:
        """(mean, std, scaling) such that diffusers' (z - mean) / (std + 1e-5) * scaling is this RAE's."""
        if self.stats is None:
            return None, None, 1.0
        if isinstance(self.stats, DiffusersLatentStats):
            return self.stats.mean.cpu(), self.stats.std.cpu(), self.stats.scaling_factor
        return self.stats.mean.cpu(), (torch.sqrt(self.stats.var + self.stats.eps) - hf.LATENT_STD_EPS).cpu(), 1.0


def _drop_encoder_weights(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix + "encoder.")]:
        del state_dict[key]


def _keep_encoder_weights(module, state_dict, prefix, *args):
    # The frozen encoder is never in a checkpoint: keep the loaded weights it already has.
    if module.encoder is None:
        return
    for key, value in module.encoder.state_dict(prefix=prefix + "encoder.").items():
        state_dict.setdefault(key, value)
