"""Training configuration: one dataclass tree for every stage, filled from a preset and `--set` overrides.

A preset is a YAML file (bundled ones live in `mfrae/configs/`, named without `.yaml`) of the form

    _some_block: &x    # optional: anchor-only keys start with `_` (blocks shared through YAML anchors)
    common:            # sections shared by every stage
      data: {...}
      rae: {...}
    stages:
      teacher: {...}   # merged over `common` when `mfrae train teacher` runs
      mfd: {...}

Any other top-level key is refused (`mfrae.config.split_preset`). `load_train_config(stage, preset_or_file,
overrides)` merges common + stages[stage] + overrides and checks every key and value of the dataclasses below
(numeric ranges through their `Bounds` hints: a negative step count or a NaN learning rate names its key). Sections configuring a component with its own constructor (`objective`,
`model.options`, `data.options`, `rae.encoder.options`) are checked against that constructor by
`mfrae.train.stages.load_stage_config`, the function `mfrae train` uses. The `data` and `rae` sections are the
`PipelineConfig` of `mfrae.pipeline`, shared with `mfrae stats`, `cache` and `sample`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from mfrae.config import Bounds, apply_overrides, deep_merge, from_dict, read_preset, split_preset
from mfrae.errors import ConfigError
from mfrae.pipeline import DataConfig, PipelineConfig, RAEConfig

STAGES = ("decoder", "teacher", "cmt", "mfd", "mft")
Stage = Literal["decoder", "teacher", "cmt", "mfd", "mft"]

# Ranges of the numeric fields below (checked by `mfrae.config.coerce`, naming the key and the value).
Count = Annotated[int, Bounds(ge=1)]  # sizes, step counts, intervals
NonNegativeInt = Annotated[int, Bounds(ge=0)]  # 0 means "off" / "none"
Positive = Annotated[float, Bounds(gt=0)]
NonNegative = Annotated[float, Bounds(ge=0)]
Fraction = Annotated[float, Bounds(ge=0, lt=1)]  # Adam betas, EMA decay


@dataclass
class ModelConfig:
    """The trained network: DiT^DH (latent stages) or ViT decoder (decoder stage)."""

    preset: str | None = "XL"  # size name (S/B/L/XL); None: everything from `options`
    options: dict = field(default_factory=dict)  # DiTDHConfig / ViTDecoderConfig fields overriding the preset
    init: str | None = None  # start from these weights (ours or released; a teacher initialises a student); "scratch": random


@dataclass
class OptimConfig:
    """AdamW with warm-up and a constant / linear / cosine schedule.

    lr(step) rises linearly from 0 over `warmup_steps`, stays at `lr` until `decay_start`, then decays
    (linear or cosine) to `final_lr` at `decay_end` (default: the last step) and stays there.
    """

    lr: Positive = 1e-4
    betas: tuple[Fraction, Fraction] = (0.9, 0.95)
    weight_decay: NonNegative = 0.0
    eps: Positive = 1e-8
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: NonNegativeInt = 0
    decay_start: NonNegativeInt = 0
    decay_end: NonNegativeInt | None = None
    final_lr: NonNegative = 0.0
    grad_clip: NonNegative = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class WandbConfig:
    """Weights & Biases logging (`pip install 'mfrae[wandb]'`): scalars and preview grids of rank 0."""

    project: str = "mfrae"
    mode: Literal["online", "offline", "disabled"] = "online"  # offline: files only, `wandb sync` later
    entity: str | None = None
    name: str | None = None  # default: the run directory's name
    tags: list[str] = field(default_factory=list)


@dataclass
class LoopConfig:
    steps: Count = 1000
    global_batch: Count = 256  # samples per optimizer step over all processes
    micro_batch: Count | None = None  # per process and forward; None = global_batch / world size
    ema_decay: Fraction = 0.9999
    seed: NonNegativeInt = 0
    precision: Literal["fp32", "bf16"] = "bf16"  # bf16 autocast applies on CUDA only
    compile: bool = False
    grad_checkpointing: bool = False
    log_every: Count = 50
    ckpt_every: Count = 1000
    keep_last: Count = 2
    sample_every: NonNegativeInt = 0  # sample grid from fixed noise every N steps (0: only at the end)
    sample_count: Count = 16
    sample_steps: NonNegativeInt = 0  # teacher previews: ODE steps (0: 50); MeanFlow previews always use 1 step
    # A larger pre-clip gradient norm stops the run as diverged (inf: never).
    max_grad_norm: Annotated[float, Bounds(gt=0, finite=False)] = 1e4
    fail_on_bad_images: bool = False
    tensorboard: bool = True  # RUN_DIR/tensorboard: every logged scalar and the preview grids
    wandb: WandbConfig | None = None  # e.g. {project: mfrae, mode: offline}; None: no W&B logging


@dataclass
class EvalConfig:
    """Quality measured during training: FD of `num_samples` EMA samples against `reference`, every `every` steps.

    Sampling goes through `mfrae.sample` (class-balanced labels, noise fixed per sample index, so every
    evaluation of a run sees the same noise) and scoring through `mfrae.eval` (the named feature extractor).
    MeanFlow stages sample with each entry of `steps` jumps (logged as `eval/fd_{n}step`), the teacher with
    each entry as its ODE network evaluations (`eval/fd_{n}nfe`).
    """

    every: NonNegativeInt = 0  # 0: off; else a multiple of train.log_every (results join that step's log record)
    num_samples: Annotated[int, Bounds(ge=2)] = 1000
    steps: list[Count] = field(default_factory=lambda: [1, 2])
    teacher_steps: list[Count] = field(default_factory=lambda: [32])
    features: str = "inception"  # a registered feature extractor (mfrae.eval.features)
    feature_options: dict = field(default_factory=dict)  # FeatureOptions fields (inception_weights, extra, ...)
    reference: str | None = None  # reference images (.npz / folder) or feature statistics (.npz with mu, sigma)
    batch_size: Count = 250
    seed: NonNegativeInt = 0


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
        # Single values are range-checked by their hints when the config is read; these relate two fields.
        loop, optim = self.train, self.optim
        if optim.decay_end is not None and optim.decay_end < optim.decay_start:
            raise ConfigError(f"optim.decay_end: {optim.decay_end} is before optim.decay_start={optim.decay_start}")
        if self.eval.every and self.eval.every % loop.log_every:
            raise ConfigError(f"eval.every must be 0 or a multiple of train.log_every={loop.log_every}, got {self.eval.every}")
        if self.eval.every and not self.eval.reference:
            raise ConfigError("eval.every > 0 needs eval.reference (reference images or feature statistics)")


#################################################################################
#                                   Presets                                     #
#################################################################################


def stage_mapping(stage: str, preset: dict, source: str) -> dict:
    """common + stages[stage] of a preset (a file without those keys is one stage's config as is)."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    common, stages = split_preset(preset, source)  # refuses unknown top-level keys; drops `_` anchor keys
    bad = sorted(set(stages) - set(STAGES))
    if bad:
        raise ConfigError(f"{source}: unknown stage {bad[0]!r} under `stages`; choose among {', '.join(STAGES)}")
    return deep_merge(common, stages.get(stage) or {})


def load_train_config(stage: str, config: str, overrides: list[str] | None = None) -> TrainConfig:
    """The config of `stage` from a preset / file and `key=value` overrides, every key and value checked
    against the dataclasses above. Component sections (`objective`, `model.options`, `data.options`,
    `rae.encoder.options`) are checked against their constructors by `mfrae.train.stages.load_stage_config`."""
    preset, source = read_preset(config)
    data = stage_mapping(stage, preset, source)
    data = apply_overrides(data, list(overrides or []))
    # A run's config.yaml records `stage: NAME`; a mapping there is a misspelt `stages:` section.
    if isinstance(data.get("stage"), dict):
        raise ConfigError(f"{source}: unknown top-level section 'stage' (a preset holds common and stages)")
    data.pop("stage", None)
    try:
        return from_dict(TrainConfig, {"stage": stage, **data})
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
