"""What differs between the stages of MF-RAE: the trained network, the objective, the inputs.

    decoder   ViT decoder          DecoderLoss (L1 + perceptual + GAN) on images, frozen encoder
    teacher   DiT^DH (velocity)    FlowMatchingLoss on RAE latents
    cmt       DiT^DH (MeanFlow)    CMTLoss on teacher trajectories           init: the teacher
    mfd       DiT^DH (MeanFlow)    MeanFlowLoss, lambda = 1 (teacher velocity) init: CMT (or the teacher)
    mft       DiT^DH (MeanFlow)    MeanFlowLoss, lambda = 0 (one-point)        init: MFD

Each builder returns a `StageParts`; `mfrae.train.engine` runs them all with one loop. Inputs named in the
config (`teacher`, `model.init`, `rae.decoder`, `rae.stats`) may be our run directories or released files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from mfrae.checkpoint import load_dit_dh, load_latent_stats, load_vit_decoder
from mfrae.config import build_from_options, check_options, option_defaults, to_dict
from mfrae.data import build_dataset
from mfrae.errors import ConfigError
from mfrae.flow.objectives import CMTLoss, FlowMatchingLoss, MeanFlowLoss
from mfrae.flow.paths import dimension_shift
from mfrae.flow.samplers import meanflow_sample, sample_ode
from mfrae.models.dit_dh import DiTDH, DiTDHConfig, dit_dh_config
from mfrae.models.encoders import RepresentationEncoder, build_encoder
from mfrae.models.rae import RAE
from mfrae.models.vit_decoder import ViTDecoder, ViTDecoderConfig, vit_decoder_config
from mfrae.train.config import TrainConfig
from mfrae.train.runs import resolve_weights

log = logging.getLogger("mfrae")


@dataclass
class StageParts:
    net: nn.Module  # the trained network
    objective: Callable[..., Tensor]  # objective(net, x, y, step) -> per-sample losses
    dataset: Dataset
    prepare: Callable[[Any, torch.device], tuple[Tensor, Tensor]]  # loader batch -> (x, y) on the device
    preview: Callable[[nn.Module, torch.Generator, int], Tensor | None] | None = None  # EMA net -> images


#################################################################################
#                              Shared pieces                                    #
#################################################################################


def build_data(cfg: TrainConfig) -> Dataset:
    options = dict(cfg.data.options)
    if cfg.train.fail_on_bad_images and cfg.data.kind == "folder":
        options["on_error"] = "raise"
    return build_dataset(cfg.data.kind, **options)


def num_classes_of(dataset: Dataset) -> int:
    n = getattr(dataset, "num_classes", None)
    if not n:
        raise ConfigError(f"the {type(dataset).__name__} dataset does not say how many classes it has")
    return int(n)


def build_rae_encoder(cfg: TrainConfig) -> RepresentationEncoder:
    return build_encoder(cfg.rae.encoder.name, **cfg.rae.encoder.options)


def build_rae(cfg: TrainConfig, device: torch.device, need_stats: bool = True) -> RAE:
    """Frozen encoder + latent statistics (+ the trained decoder when the config names one), in eval mode."""
    if need_stats and not cfg.rae.stats:
        raise ConfigError(
            f"stage {cfg.stage} trains on normalised RAE latents: set rae.stats (compute it with `mfrae stats`)"
        )
    stats = load_latent_stats(resolve_weights(cfg.rae.stats)) if cfg.rae.stats else None
    decoder = load_vit_decoder(resolve_weights(cfg.rae.decoder)) if cfg.rae.decoder else None
    return RAE(build_rae_encoder(cfg), decoder, stats).to(device).eval()


def _to_device(batch, device: torch.device) -> tuple[Tensor, Tensor]:
    x, y = batch
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def latent_inputs(cfg: TrainConfig, rae: RAE) -> tuple[Dataset, Callable, tuple[int, int, int]]:
    """Dataset, batch -> (latents, labels), and the latent shape: encoded on the fly or read from a cache."""
    if cfg.data.kind == "latents":
        # The cache holds raw encoder latents: it must come from this encoder, and is normalised here.
        cfg.data.options.setdefault("expected_fingerprint", rae.encoder.fingerprint())
        dataset = build_data(cfg)
        shape = tuple(dataset[0][0].shape)
        if shape != rae.latent_shape:
            raise ConfigError(f"latent cache holds {shape} latents, the configured RAE makes {rae.latent_shape}")

        def prepare_cached(batch, device):
            latents, labels = _to_device(batch, device)
            return rae.stats.normalize(latents.float()), labels

        return dataset, prepare_cached, shape

    dataset = build_data(cfg)

    @torch.no_grad()
    def prepare(batch, device):
        images, labels = _to_device(batch, device)
        return rae.encode(images), labels

    return dataset, prepare, rae.latent_shape


def dit_config(cfg: TrainConfig, latent_shape: tuple[int, int, int], num_classes: int, meanflow: bool) -> DiTDHConfig:
    """Preset size + the latent geometry and class count of the data + `model.options` overrides."""
    fields = dit_dh_config(cfg.model.preset).to_dict() if cfg.model.preset else DiTDHConfig().to_dict()
    fields.update(in_channels=latent_shape[0], input_size=latent_shape[1], num_classes=num_classes)
    fields.update(cfg.model.options)
    fields["interval_embedding"] = meanflow
    return build_from_options(DiTDHConfig, fields, "model.options")


def frozen_teacher(spec: str, device: torch.device) -> DiTDH:
    teacher = load_dit_dh(resolve_weights(spec), meanflow=False)
    return teacher.to(device).eval().requires_grad_(False)


def objective_options(cfg: TrainConfig, latent_shape, target, **defaults) -> dict:
    """The configured objective options over stage defaults; the time shift defaults to sqrt(C H W / 4096).

    The resolved options (the constructor's defaults included) are written back into `cfg.objective`, so the
    run directory's config.yaml records exactly what ran.
    """
    options = {"shift": dimension_shift(latent_shape), **defaults, **cfg.objective}
    schedule = options.get("schedule")
    if isinstance(schedule, dict) and "total_steps" not in schedule:
        options["schedule"] = {**schedule, "total_steps": cfg.train.steps}  # the 2511.19065 horizon: the whole run
    cfg.objective = to_dict({**option_defaults(target, skip=("teacher",)), **options})
    return options


def _preview_labels(count: int, num_classes: int, device) -> Tensor:
    return torch.arange(count, device=device) % num_classes


def _decoded(rae: RAE, latents: Tensor) -> Tensor | None:
    return rae.decode(latents).clamp(0, 1) if rae.decoder is not None else None


#################################################################################
#                                  Stages                                       #
#################################################################################


def decoder_stage(cfg: TrainConfig, device: torch.device) -> StageParts:
    from mfrae.train.decoder_loss import DecoderLoss
    from mfrae.train.engine import learning_rate

    encoder = build_rae_encoder(cfg).to(device)
    dataset = build_data(cfg)
    image_size = dataset[0][0].shape[-1]
    if image_size % encoder.grid_size:
        raise ConfigError(f"image size {image_size} is not a multiple of the encoder grid {encoder.grid_size}")
    fields = vit_decoder_config(cfg.model.preset).to_dict() if cfg.model.preset else ViTDecoderConfig().to_dict()
    fields.update(encoder_hidden_size=encoder.hidden_size, num_patches=encoder.num_tokens,
                  patch_size=image_size // encoder.grid_size)
    fields.update(cfg.model.options)
    config = build_from_options(ViTDecoderConfig, fields, "model.options")
    net = load_vit_decoder(resolve_weights(cfg.model.init), config) if cfg.model.init else ViTDecoder(config)
    # The discriminator follows the decoder's learning-rate schedule (as in the RAE recipe).
    disc_schedule = lambda step: learning_rate(cfg.optim, step, cfg.train.steps) / cfg.optim.lr  # noqa: E731
    options = {"noise_tau": cfg.rae.noise_tau, "noise_dist": cfg.rae.noise_dist, **cfg.objective}
    objective = build_from_options(
        DecoderLoss, options, "objective", fixed={"encoder": encoder, "disc_lr_schedule": disc_schedule}
    ).to(device)
    cfg.objective = to_dict({**option_defaults(DecoderLoss, skip=("encoder", "disc_lr_schedule")), **options})
    fixed_images = torch.stack([dataset[i][0] for i in range(min(len(dataset), cfg.train.sample_count))])

    @torch.no_grad()
    def preview(ema: nn.Module, generator: torch.Generator, count: int) -> Tensor:
        images = fixed_images[:count].to(device)
        recon = RAE(encoder, ema).eval()(images).clamp(0, 1)
        return torch.cat([images, recon])  # originals, then reconstructions

    return StageParts(net, objective, dataset, _to_device, preview)


def teacher_stage(cfg: TrainConfig, device: torch.device) -> StageParts:
    rae = build_rae(cfg, device)
    dataset, prepare, shape = latent_inputs(cfg, rae)
    classes = num_classes_of(dataset)
    config = dit_config(cfg, shape, classes, meanflow=False)
    net = load_dit_dh(resolve_weights(cfg.model.init), config) if cfg.model.init else DiTDH(config)
    objective = build_from_options(FlowMatchingLoss, objective_options(cfg, shape, FlowMatchingLoss), "objective")
    ode_points = cfg.train.sample_steps or 50

    @torch.no_grad()
    def preview(ema: nn.Module, generator: torch.Generator, count: int) -> Tensor | None:
        noise = torch.randn(count, *shape, generator=generator).to(device)
        latents = sample_ode(ema, noise, _preview_labels(count, classes, device), num_points=ode_points,
                             shift=objective.shift)
        return _decoded(rae, latents)

    return StageParts(net, objective, dataset, prepare, preview)


def _meanflow_stage(cfg: TrainConfig, device: torch.device, target, build_objective, **defaults) -> StageParts:
    rae = build_rae(cfg, device)
    dataset, prepare, shape = latent_inputs(cfg, rae)
    classes = num_classes_of(dataset)
    config = dit_config(cfg, shape, classes, meanflow=True)
    teacher = frozen_teacher(cfg.teacher, device) if cfg.teacher else None
    init = cfg.model.init or cfg.teacher  # a teacher file initialises everything but the interval embedding
    if init is None:
        raise ConfigError(f"stage {cfg.stage} starts from trained weights: set model.init (or teacher)")
    net = load_dit_dh(resolve_weights(init), config)
    objective = build_objective(teacher, objective_options(cfg, shape, target, **defaults))

    @torch.no_grad()
    def preview(ema: nn.Module, generator: torch.Generator, count: int) -> Tensor | None:
        noise = torch.randn(count, *shape, generator=generator).to(device)
        return _decoded(rae, meanflow_sample(ema, noise, _preview_labels(count, classes, device), steps=1))

    return StageParts(net, objective, dataset, prepare, preview)


def cmt_stage(cfg: TrainConfig, device: torch.device) -> StageParts:
    return _meanflow_stage(cfg, device, CMTLoss, _with_teacher(CMTLoss))


def mfd_stage(cfg: TrainConfig, device: torch.device) -> StageParts:
    return _meanflow_stage(cfg, device, MeanFlowLoss, _with_teacher(MeanFlowLoss), teacher_weight=1.0)


def mft_stage(cfg: TrainConfig, device: torch.device) -> StageParts:
    # Bootstrapping: the one-point velocity e - x (lambda = 0); a configured teacher enables lambda in (0, 1].
    return _meanflow_stage(cfg, device, MeanFlowLoss, _with_teacher(MeanFlowLoss), teacher_weight=0.0)


def _with_teacher(objective_class):
    return lambda teacher, options: build_from_options(objective_class, options, "objective", fixed={"teacher": teacher})


def check_stage_options(cfg: TrainConfig) -> None:
    """Refuse unknown or badly typed component options before anything is built or written."""
    from mfrae.data import DATASETS
    from mfrae.models.encoders import ENCODERS

    if cfg.data.kind not in DATASETS:
        raise ConfigError(f"data.kind: unknown dataset {cfg.data.kind!r}; choose one of {sorted(DATASETS)}")
    check_options(DATASETS[cfg.data.kind], cfg.data.options, "data.options")
    if cfg.rae.encoder.name not in ENCODERS:
        raise ConfigError(f"rae.encoder.name: unknown encoder {cfg.rae.encoder.name!r}; choose one of {sorted(ENCODERS)}")
    check_options(ENCODERS[cfg.rae.encoder.name], cfg.rae.encoder.options, "rae.encoder.options")
    if cfg.stage == "decoder":
        from mfrae.train.decoder_loss import DecoderLoss

        check_options(ViTDecoderConfig, cfg.model.options, "model.options")
        check_options(DecoderLoss, cfg.objective, "objective", skip=("encoder", "disc_lr_schedule"))
        return
    check_options(DiTDHConfig, cfg.model.options, "model.options")
    objective = {"teacher": FlowMatchingLoss, "cmt": CMTLoss}.get(cfg.stage, MeanFlowLoss)
    check_options(objective, cfg.objective, "objective", skip=("teacher",))


STAGE_BUILDERS = {
    "decoder": decoder_stage,
    "teacher": teacher_stage,
    "cmt": cmt_stage,
    "mfd": mfd_stage,
    "mft": mft_stage,
}


def build_stage(cfg: TrainConfig, device: torch.device) -> StageParts:
    return STAGE_BUILDERS[cfg.stage](cfg, device)
