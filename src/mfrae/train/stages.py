"""The stage registry: what differs between the stages of MF-RAE, as data.

    stage     network               objective                                   starts from
    decoder   ViT decoder           DecoderLoss (L1 + perceptual + GAN) + disc  scratch (or model.init)
    teacher   DiT^DH (velocity)     FlowMatchingLoss on RAE latents             scratch (or model.init)
    cmt       DiT^DH (MeanFlow)     CMTLoss on teacher trajectories             the teacher
    mfd       DiT^DH (MeanFlow)     MeanFlowLoss, teacher_mix = 1               CMT (or the teacher)
    mft       DiT^DH (MeanFlow)     MeanFlowLoss, teacher_mix = 0 (one-point)   MFD

Each row of `REGISTRY` names the objective whose options the `objective` section holds, the model config whose
fields `model.options` may set, the objective options the stage fixes unless configured, and the builder that
turns a `TrainConfig` into `StageParts` (the contract of `mfrae.train.parts`). `train_stage` builds the parts
and hands them to the engine, which knows nothing of this module. Inputs named in the config (`teacher`,
`model.init`, `rae.decoder`, `rae.stats`) may be our run directories or the authors' released files.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from mfrae.checkpoint import load_dit_dh, load_vit_decoder
from mfrae.config import build_from_options, check_options, from_dict, option_defaults, read_preset, to_dict
from mfrae.distributed import DistInfo
from mfrae.errors import ConfigError
from mfrae.flow.objectives import CMTLoss, FlowMatchingLoss, MeanFlowLoss
from mfrae.flow.paths import PairSampler, dimension_shift
from mfrae.flow.samplers import flow_matching_sample, meanflow_sample
from mfrae.models.dit_dh import DiTDH, DiTDHConfig, dit_dh_config
from mfrae.models.rae import RAE
from mfrae.models.vit_decoder import ViTDecoder, ViTDecoderConfig, vit_decoder_config
from mfrae.pipeline import build_data, build_rae, build_rae_encoder, check_pipeline_options, latent_inputs, num_classes_of, to_device
from mfrae.train import engine
from mfrae.train.config import TrainConfig, load_train_config
from mfrae.train.decoder_parts import DecoderObjectiveOptions, build_decoder_objective
from mfrae.train.evaluation import meanflow_evaluator, teacher_evaluator
from mfrae.train.optim import learning_rate
from mfrae.train.parts import StageParts
from mfrae.train.runs import resolve_weights

# Constructor arguments the builder supplies itself: never config options.
BUILDER_SUPPLIED = ("teacher", "null_class")
# `model.init` value of a latent stage that starts from random weights (e.g. MeanFlow from scratch, arXiv 2511.19065).
SCRATCH = "scratch"


@dataclass(frozen=True)
class StageSpec:
    """One row of the registry."""

    build: Callable[[TrainConfig, DistInfo, "StageSpec"], StageParts]
    objective: type  # its constructor (or, for a dataclass, its fields) defines the `objective` section
    model_config: type  # DiTDHConfig | ViTDecoderConfig: what `model.options` may set
    defaults: dict = field(default_factory=dict)  # objective options the stage fixes unless configured


#################################################################################
#                              Shared pieces                                    #
#################################################################################


def dit_config(cfg: TrainConfig, latent_shape: tuple[int, int, int], num_classes: int, meanflow: bool) -> DiTDHConfig:
    """Preset size + the latent geometry and class count of the data + `model.options` overrides."""
    fields = dit_dh_config(cfg.model.preset).to_dict() if cfg.model.preset else DiTDHConfig().to_dict()
    fields.update(in_channels=latent_shape[0], input_size=latent_shape[1], num_classes=num_classes)
    fields.update(cfg.model.options)
    fields["interval_embedding"] = meanflow
    config = build_from_options(DiTDHConfig, fields, "model.options")
    if config.num_classes < num_classes:  # a label past the class table would crash the first step
        raise ConfigError(f"model.options.num_classes={config.num_classes} is fewer than the {num_classes} classes of the data")
    return config


def frozen_teacher(spec: str, device: torch.device) -> DiTDH:
    teacher = load_dit_dh(resolve_weights(spec), meanflow=False)
    return teacher.to(device).eval().requires_grad_(False)


def with_schedule_horizon(cfg: TrainConfig) -> dict:
    """The `objective` section with an ImprovedSchedule's horizon defaulting to the whole run (arXiv 2511.19065)."""
    options = dict(cfg.objective)
    schedule = options.get("schedule")
    if isinstance(schedule, dict) and "total_steps" not in schedule:
        options["schedule"] = {**schedule, "total_steps": cfg.train.steps}
    return options


def objective_options(cfg: TrainConfig, latent_shape, spec: StageSpec) -> tuple[dict, dict]:
    """(options to build the objective with, the resolved options to record in config.yaml).

    Configured options override the stage's defaults; the time shift defaults to sqrt(C H W / 4096)
    (the dimension-dependent shift of RAE, arXiv 2510.11690); an ImprovedSchedule's horizon defaults to the whole run (arXiv 2511.19065).
    """
    options = {"shift": dimension_shift(latent_shape), **spec.defaults, **with_schedule_horizon(cfg)}
    resolved = to_dict({**option_defaults(spec.objective, skip=BUILDER_SUPPLIED), **options})
    return options, resolved


def _preview_labels(count: int, num_classes: int, device) -> Tensor:
    return torch.arange(count, device=device) % num_classes


def _rae_for_eval(cfg: TrainConfig, rae: RAE) -> RAE:
    if rae.decoder is None:
        raise ConfigError(f"eval.every > 0: stage {cfg.stage} evaluates decoded samples, set rae.decoder")
    return rae


def _decoded(rae: RAE, latents: Tensor) -> Tensor | None:
    return rae.decode(latents).clamp(0, 1) if rae.decoder is not None else None


#################################################################################
#                                  Builders                                     #
#################################################################################


def decoder_stage(cfg: TrainConfig, info: DistInfo, spec: StageSpec) -> StageParts:
    device = info.device
    encoder = build_rae_encoder(cfg.rae).to(device)
    dataset = build_data(cfg.data, cfg.train.fail_on_bad_images)
    image_size = dataset[0][0].shape[-1]
    if image_size % encoder.grid_size:
        raise ConfigError(f"image size {image_size} is not a multiple of the encoder grid {encoder.grid_size}")
    fields = vit_decoder_config(cfg.model.preset).to_dict() if cfg.model.preset else ViTDecoderConfig().to_dict()
    fields.update(encoder_hidden_size=encoder.hidden_size, num_patches=encoder.num_tokens,
                  patch_size=image_size // encoder.grid_size)
    fields.update(cfg.model.options)
    config = build_from_options(ViTDecoderConfig, fields, "model.options")
    net = load_vit_decoder(resolve_weights(cfg.model.init), config) if cfg.model.init else ViTDecoder(config)
    net.grad_checkpointing = cfg.train.grad_checkpointing
    options = from_dict(DecoderObjectiveOptions, cfg.objective, "objective")
    # Noise augmentation of the tokens comes from the RAE (rae.noise_tau / rae.noise_dist): one noise path.
    rae = RAE(encoder, None, None, noise_tau=cfg.rae.noise_tau, noise_dist=cfg.rae.noise_dist).to(device)
    # The discriminator follows the decoder's learning-rate schedule (as in the RAE recipe).
    lr_factor = lambda step: learning_rate(cfg.optim, step, cfg.train.steps) / cfg.optim.lr  # noqa: E731
    objective, players = build_decoder_objective(options, rae, net, lr_factor)
    objective = objective.to(device)
    for player in players:
        player.module.to(device)
    fixed_images = torch.stack([dataset[i][0] for i in range(min(len(dataset), cfg.train.sample_count))])

    @torch.no_grad()
    def preview(ema: nn.Module, generator: torch.Generator, count: int) -> Tensor:
        images = fixed_images[:count].to(device)
        recon = RAE(encoder, ema).eval()(images).clamp(0, 1)
        return torch.cat([images, recon])  # originals, then reconstructions

    return StageParts(net, objective, dataset, to_device, preview, players=players,
                      objective_config=to_dict(options), log_stats=lambda: objective.last_stats)


def _latent_stage_inputs(cfg: TrainConfig, device: torch.device, meanflow: bool):
    """(RAE, latent inputs, class count, DiT^DH config) of a latent stage, built in this order."""
    rae = build_rae(cfg.rae, device, stats_needed_by=f"stage {cfg.stage}")
    inputs = latent_inputs(cfg.data, rae, cfg.train.fail_on_bad_images)
    classes = num_classes_of(inputs.dataset)
    return rae, inputs, classes, dit_config(cfg, inputs.shape, classes, meanflow=meanflow)


def flow_matching_stage(cfg: TrainConfig, info: DistInfo, spec: StageSpec) -> StageParts:
    device = info.device
    rae, inputs, classes, config = _latent_stage_inputs(cfg, device, meanflow=False)
    net = load_dit_dh(resolve_weights(cfg.model.init), config) if cfg.model.init else DiTDH(config)
    net.grad_checkpointing = cfg.train.grad_checkpointing
    options, resolved = objective_options(cfg, inputs.shape, spec)
    objective = build_from_options(spec.objective, options, "objective", fixed={"null_class": net.null_class})
    ode_points = cfg.train.sample_steps or 50
    evaluate = teacher_evaluator(cfg.eval, _rae_for_eval(cfg, rae), classes, objective.shift, info) if cfg.eval.every else None

    @torch.no_grad()
    def preview(ema: nn.Module, generator: torch.Generator, count: int) -> Tensor | None:
        noise = torch.randn(count, *inputs.shape, generator=generator).to(device)
        latents = flow_matching_sample(ema, noise, _preview_labels(count, classes, device), num_points=ode_points,
                                       shift=objective.shift)
        return _decoded(rae, latents)

    return StageParts(net, objective, inputs.dataset, inputs.prepare, preview, objective_config=resolved,
                      evaluate=evaluate)


def meanflow_stage(cfg: TrainConfig, info: DistInfo, spec: StageSpec) -> StageParts:
    device = info.device
    rae, inputs, classes, config = _latent_stage_inputs(cfg, device, meanflow=True)
    teacher = frozen_teacher(cfg.teacher, device) if cfg.teacher else None
    init = cfg.model.init or cfg.teacher  # a teacher file initialises everything but the interval embedding
    if init is None:
        raise ConfigError(f"stage {cfg.stage} starts from trained weights: set model.init (or teacher), "
                          f"or model.init={SCRATCH} for random weights")
    net = DiTDH(config) if init == SCRATCH else load_dit_dh(resolve_weights(init), config)
    net.grad_checkpointing = cfg.train.grad_checkpointing
    options, resolved = objective_options(cfg, inputs.shape, spec)
    objective = build_from_options(spec.objective, options, "objective",
                                   fixed={"teacher": teacher, "null_class": net.null_class})
    evaluate = meanflow_evaluator(cfg.eval, _rae_for_eval(cfg, rae), classes, info) if cfg.eval.every else None

    @torch.no_grad()
    def preview(ema: nn.Module, generator: torch.Generator, count: int) -> Tensor | None:
        noise = torch.randn(count, *inputs.shape, generator=generator).to(device)
        return _decoded(rae, meanflow_sample(ema, noise, _preview_labels(count, classes, device), steps=1))

    # MeanFlow's weighted loss L / sg(L + c) stays near 1: log the plain MSE per row kind next to it.
    log_stats = (lambda: objective.last_stats) if spec.objective is MeanFlowLoss else None
    return StageParts(net, objective, inputs.dataset, inputs.prepare, preview, objective_config=resolved,
                      evaluate=evaluate, log_stats=log_stats)


#################################################################################
#                                  Registry                                     #
#################################################################################


REGISTRY: dict[str, StageSpec] = {
    "decoder": StageSpec(decoder_stage, DecoderObjectiveOptions, ViTDecoderConfig),
    "teacher": StageSpec(flow_matching_stage, FlowMatchingLoss, DiTDHConfig),
    "cmt": StageSpec(meanflow_stage, CMTLoss, DiTDHConfig),
    "mfd": StageSpec(meanflow_stage, MeanFlowLoss, DiTDHConfig, {"teacher_mix": 1.0}),
    # Bootstrapping: the one-point velocity e - x; a configured teacher enables teacher_mix in (0, 1].
    "mft": StageSpec(meanflow_stage, MeanFlowLoss, DiTDHConfig, {"teacher_mix": 0.0}),
}


def check_stage_options(cfg: TrainConfig) -> None:
    """Refuse unknown or badly typed component options before anything is built or written."""
    check_pipeline_options(cfg.pipeline)
    spec = REGISTRY[cfg.stage]
    check_options(spec.model_config, cfg.model.options, "model.options")
    if dataclasses.is_dataclass(spec.objective):
        from_dict(spec.objective, cfg.objective, "objective")
    else:
        check_options(spec.objective, with_schedule_horizon(cfg), "objective", skip=BUILDER_SUPPLIED)
    if spec.objective is MeanFlowLoss:
        check_row_layout(cfg, spec)


def check_row_layout(cfg: TrainConfig, spec: StageSpec) -> None:
    """MeanFlow's "prefix" row layout counts its r != t rows per optimizer step: refuse a global batch too small
    to hold the configured fraction (e.g. 1 row at fraction 0.25 would train no r != t row at all)."""
    options = {**option_defaults(MeanFlowLoss, skip=BUILDER_SUPPLIED), **spec.defaults, **cfg.objective}
    if options["r_neq_t_layout"] != "prefix":
        return
    fraction = float(options["fraction_r_neq_t"])
    try:
        PairSampler(fraction_r_neq_t=fraction, layout="prefix").check_step_rows(cfg.train.global_batch)
    except ValueError as err:
        raise ConfigError(f"objective.fraction_r_neq_t={fraction} with objective.r_neq_t_layout=prefix and "
                          f"train.global_batch={cfg.train.global_batch}: {err}") from None


def load_stage_config(stage: str, config: str, overrides: list[str] | None = None) -> TrainConfig:
    """`load_train_config` plus the component checks: the config `mfrae train STAGE` runs with."""
    cfg = load_train_config(stage, config, overrides)
    try:
        check_stage_options(cfg)
    except ConfigError as err:
        raise ConfigError(f"{read_preset(config)[1]}: {err}") from None
    return cfg


def build_stage(cfg: TrainConfig, info: DistInfo) -> StageParts:
    """The parts of `cfg.stage` for this process (`info`: its device, rank and world size)."""
    spec = REGISTRY[cfg.stage]
    return spec.build(cfg, info, spec)


def train_stage(cfg: TrainConfig, out: str | Path, resume: bool = False, command: list[str] | None = None,
                stop=None) -> Path | None:
    """Build the stage's parts and train them in run directory `out`; returns the last checkpoint folder.
    `stop`: see `mfrae.train.engine.train` (a signal stops the run after a step, with a checkpoint)."""
    return engine.train(cfg, lambda info: build_stage(cfg, info), out, resume=resume, command=command, stop=stop)
