"""Training configuration: one dataclass tree for every stage, filled from a preset and `--set` overrides.

A preset is a YAML file (bundled ones live in `mfrae/configs/`, named without `.yaml`) of the form

    some_anchor: &x    # optional: mappings shared by several stages through YAML anchors
    common:            # sections shared by every stage
      data: {...}
      rae: {...}
    stages:
      teacher: {...}   # merged over `common` when `mfrae train teacher` runs
      mfd: {...}

`load_train_config(stage, preset_or_file, overrides)` merges common + stages[stage] + overrides and checks every
key and value of the dataclasses below. Sections configuring a component with its own constructor (`objective`,
`model.options`, `data.options`, `rae.encoder.options`) are checked against that constructor by
`mfrae.train.stages.load_stage_config`, the function `mfrae train` uses. The `data` and `rae` sections are the
`PipelineConfig` of `mfrae.pipeline`, shared with `mfrae stats`, `cache` and `sample`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mfrae.config import apply_overrides, deep_merge, from_dict, read_preset
from mfrae.errors import ConfigError
from mfrae.pipeline import DataConfig, PipelineConfig, RAEConfig

STAGES = ("decoder", "teacher", "cmt", "mfd", "mft")
Stage = Literal["decoder", "teacher", "cmt", "mfd", "mft"]


@dataclass
class ModelConfig:
    """The trained network: DiT^DH (latent stages) or ViT decoder (decoder stage)."""

    preset: str | None = "XL"  # size name (S/B/L/XL); None: everything from `options`
    options: dict = field(default_factory=dict)  # DiTDHConfig / ViTDecoderConfig fields overriding the preset
    init: str | None = None  # start from these weights (ours or released; a teacher initialises a student)


@dataclass
class OptimConfig:
    """AdamW with warm-up and a constant / linear / cosine schedule.

    lr(step) rises linearly from 0 over `warmup_steps`, stays at `lr` until `decay_start`, then decays
    (linear or cosine) to `final_lr` at `decay_end` (default: the last step) and stays there.
    """

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    eps: float = 1e-8
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    decay_start: int = 0
    decay_end: int | None = None
    final_lr: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class LoopConfig:
    steps: int = 1000
    global_batch: int = 256  # samples per optimizer step over all processes
    micro_batch: int | None = None  # per process and forward; None = global_batch / world size
    ema_decay: float = 0.9999
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "bf16"  # bf16 autocast applies on CUDA only
    compile: bool = False
    grad_checkpointing: bool = False
    log_every: int = 50
    ckpt_every: int = 1000
    keep_last: int = 2
    sample_every: int = 0  # sample grid from fixed noise every N steps (0: only at the end)
    sample_count: int = 16
    sample_steps: int = 0  # teacher previews: ODE steps (0: 50); MeanFlow previews always use 1 step
    max_grad_norm: float = 1e4  # a larger pre-clip gradient norm stops the run as diverged
    fail_on_bad_images: bool = False
    tensorboard: bool = True


@dataclass
class EvalConfig:
    """Quality measured during training: FD of `num_samples` EMA samples against `reference`, every `every` steps.

    Sampling goes through `mfrae.sample` (class-balanced labels, noise fixed per sample index, so every
    evaluation of a run sees the same noise) and scoring through `mfrae.eval` (the named feature extractor).
    MeanFlow stages sample with each entry of `steps` jumps (logged as `eval/fd_{n}step`), the teacher with
    each entry as its ODE network evaluations (`eval/fd_{n}nfe`).
    """

    every: int = 0  # 0: off; else a multiple of train.log_every (results join that step's log record)
    num_samples: int = 1000
    steps: list[int] = field(default_factory=lambda: [1, 2])
    teacher_steps: list[int] = field(default_factory=lambda: [32])
    features: str = "inception"  # a registered feature extractor (mfrae.eval.features)
    feature_options: dict = field(default_factory=dict)  # FeatureOptions fields (inception_weights, extra, ...)
    reference: str | None = None  # reference images (.npz / folder) or feature statistics (.npz with mu, sigma)
    batch_size: int = 250
    seed: int = 0


@dataclass
class TrainConfig:
    stage: Stage
    data: DataConfig = field(default_factory=DataConfig)
    rae: RAEConfig = field(default_factory=RAEConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: str | None = None  # frozen flow-matching teacher (cmt, mfd; optional for mft)
    objective: dict = field(default_factory=dict)  # options of the stage's objective
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def pipeline(self) -> PipelineConfig:
        """The `data` + `rae` sections this stage shares with `mfrae stats`, `cache` and `sample`."""
        return PipelineConfig(self.data, self.rae)

    def __post_init__(self):
        if self.stage in ("cmt", "mfd") and not self.teacher:
            raise ConfigError(f"stage {self.stage} distils a teacher: set `teacher` (a checkpoint or run directory)")
        loop = self.train
        for name in ("steps", "global_batch", "log_every", "ckpt_every", "keep_last", "sample_count"):
            if getattr(loop, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(loop, name)}")
        if loop.micro_batch is not None and loop.micro_batch < 1:
            raise ConfigError(f"train.micro_batch must be >= 1, got {loop.micro_batch}")
        if not 0.0 <= loop.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {loop.ema_decay}")
        if self.optim.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.optim.lr}")
        if self.eval.every < 0 or (self.eval.every and self.eval.every % loop.log_every):
            raise ConfigError(f"eval.every must be 0 or a multiple of train.log_every={loop.log_every}, got {self.eval.every}")
        if self.eval.every and not self.eval.reference:
            raise ConfigError("eval.every > 0 needs eval.reference (reference images or feature statistics)")
        if self.eval.num_samples < 2 or self.eval.batch_size < 1 or not all(n >= 1 for n in [*self.eval.steps, *self.eval.teacher_steps]):
            raise ConfigError("eval.num_samples must be >= 2, eval.batch_size >= 1 and every entry of eval.steps / teacher_steps >= 1")
        if self.optim.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip must be >= 0, got {self.optim.grad_clip}")


#################################################################################
#                                   Presets                                     #
#################################################################################


def stage_mapping(stage: str, preset: dict, source: str) -> dict:
    """common + stages[stage] of a preset (a file without those keys is one stage's config as is)."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    if "common" not in preset and "stages" not in preset:
        return preset
    # Other top-level keys are YAML anchors shared between stages (e.g. `dit: &dit`), not config.
    unknown = sorted(k for k in set(preset) - {"common", "stages"} if not isinstance(preset[k], dict))
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key {unknown[0]!r} (a preset holds `common` and `stages`)")
    stages = preset.get("stages") or {}
    bad = sorted(set(stages) - set(STAGES))
    if bad:
        raise ConfigError(f"{source}: unknown stage {bad[0]!r} under `stages`")
    return deep_merge(preset.get("common") or {}, stages.get(stage) or {})


def load_train_config(stage: str, config: str, overrides: list[str] | None = None) -> TrainConfig:
    """The config of `stage` from a preset / file and `key=value` overrides, every key and value checked
    against the dataclasses above. Component sections (`objective`, `model.options`, `data.options`,
    `rae.encoder.options`) are checked against their constructors by `mfrae.train.stages.load_stage_config`."""
    preset, source = read_preset(config)
    data = stage_mapping(stage, preset, source)
    data = apply_overrides(data, list(overrides or []))
    data.pop("stage", None)
    try:
        return from_dict(TrainConfig, {"stage": stage, **data})
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
