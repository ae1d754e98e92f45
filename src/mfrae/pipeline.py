"""The part of a config every command shares: which images (`data`) and which autoencoder (`rae`).

`PipelineConfig` is what `mfrae stats`, `mfrae cache`, `mfrae sample` and every training stage agree on; a
stage's `TrainConfig` holds the same two sections next to its model, objective and loop. The builders here turn
those sections into objects (dataset, frozen encoder, RAE, the latent inputs of a latent stage); they return
what they resolve and never write into the config they read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mfrae.checkpoint import load_latent_stats, load_vit_decoder
from mfrae.config import Bounds, apply_overrides, check_options, from_dict, read_preset, split_preset
from mfrae.data import DATASETS, build_dataset
from mfrae.errors import ConfigError
from mfrae.models.encoders import DINOV2_B_REG, ENCODERS, RepresentationEncoder, build_encoder
from mfrae.models.rae import RAE
from mfrae.train.runs import resolve_weights

#################################################################################
#                                  Sections                                     #
#################################################################################


@dataclass
class DataConfig:
    """Which dataset (`mfrae.data.build_dataset(kind, **options)`) and how to load it."""

    kind: str = "folder"  # digits | folder | latents (a cache made by `mfrae cache`)
    options: dict = field(default_factory=dict)  # the dataset's constructor options (root, image_size, ...)
    num_workers: Annotated[int, Bounds(ge=0)] = 4
    pin_memory: bool = True
    prefetch_factor: Annotated[int, Bounds(ge=1)] = 2


@dataclass
class EncoderConfig:
    name: str = "dinov2"  # registered encoder (mfrae.models.encoders)
    options: dict = field(default_factory=lambda: {"path": DINOV2_B_REG, "input_size": 224})


@dataclass
class RAEConfig:
    # A diffusers AutoencoderRAE folder or Hub id (e.g. nyu-visionx/RAE-dinov2-wReg-base-ViTXL-n08): encoder,
    # decoder and statistics in one, with diffusers' latent normalisation; then `encoder` is not used and
    # `decoder` / `stats` must stay unset (docs/huggingface.md, section 1).
    pretrained: str | None = None
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: str | None = None  # trained decoder: our run dir / file, or a released model.pt
    stats: str | None = None  # latent statistics: stat.pt, our stats file, or a run dir of `mfrae stats`
    noise_tau: Annotated[float, Bounds(ge=0)] = 0.8  # decoder training only
    noise_dist: Literal["uniform", "halfnormal"] = "uniform"


@dataclass
class PipelineConfig:
    data: DataConfig = field(default_factory=DataConfig)
    rae: RAEConfig = field(default_factory=RAEConfig)


PIPELINE_SECTIONS = ("data", "rae")


def load_pipeline_config(config: str, overrides: list[str] | None = None) -> PipelineConfig:
    """`data` + `rae` of a preset's `common` section (or of a one-stage file), with `key=value` overrides."""
    preset, source = read_preset(config)
    base, _ = split_preset(preset, source)
    data = {key: base[key] for key in PIPELINE_SECTIONS if key in base}
    data = apply_overrides(data, list(overrides or []))
    try:
        cfg = from_dict(PipelineConfig, data)
        check_pipeline_options(cfg)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return cfg


def check_pipeline_options(cfg: PipelineConfig) -> None:
    """Refuse an unknown dataset / encoder, or options their constructors do not take, before anything runs."""
    if cfg.data.kind not in DATASETS:
        raise ConfigError(f"data.kind: unknown dataset {cfg.data.kind!r}; choose one of {sorted(DATASETS)}")
    check_options(DATASETS[cfg.data.kind], cfg.data.options, "data.options")
    if cfg.rae.encoder.name not in ENCODERS:
        raise ConfigError(f"rae.encoder.name: unknown encoder {cfg.rae.encoder.name!r}; choose one of {sorted(ENCODERS)}")
    check_options(ENCODERS[cfg.rae.encoder.name], cfg.rae.encoder.options, "rae.encoder.options")
    check_rae_sources(cfg.rae)


def check_rae_sources(rae: RAEConfig) -> None:
    """A diffusers RAE folder brings its own decoder and statistics: refuse a second source for them."""
    given = [key for key in ("decoder", "stats") if getattr(rae, key)]
    if rae.pretrained and given:
        raise ConfigError(f"rae.pretrained ({rae.pretrained}) holds the decoder and the latent statistics: unset "
                          + " and ".join(f"rae.{key}" for key in given))


#################################################################################
#                                  Builders                                     #
#################################################################################


def build_data(data: DataConfig, fail_on_bad_images: bool = False, **options: Any) -> Dataset:
    """The configured dataset; `options` add to / replace `data.options` (the config is left as it is)."""
    options = {**data.options, **options}
    if fail_on_bad_images and data.kind == "folder":
        options["on_error"] = "raise"
    return build_dataset(data.kind, **options)


def num_classes_of(dataset: Dataset) -> int:
    n = getattr(dataset, "num_classes", None)
    if not n:
        raise ConfigError(f"the {type(dataset).__name__} dataset does not say how many classes it has")
    return int(n)


def build_rae_encoder(rae: RAEConfig) -> RepresentationEncoder:
    """The frozen encoder: `rae.pretrained`'s (diffusers folder), else the registered `rae.encoder`."""
    if rae.pretrained:
        return RAE.from_pretrained(rae.pretrained).encoder
    return build_encoder(rae.encoder.name, **rae.encoder.options)


def build_rae(rae: RAEConfig, device: torch.device, stats_needed_by: str | None = None) -> RAE:
    """Frozen encoder + latent statistics (+ the trained decoder when the config names one), in eval mode.

    stats_needed_by: who needs `rae.stats` (for the error message when it is not set); None: optional.
    """
    if rae.pretrained:
        check_rae_sources(rae)
        pretrained = RAE.from_pretrained(rae.pretrained)
        if stats_needed_by and pretrained.stats is None:
            raise ConfigError(f"{stats_needed_by} trains on normalised RAE latents, and rae.pretrained "
                              f"({rae.pretrained}) holds no latents_mean / latents_std")
        return pretrained.to(device).eval()
    if stats_needed_by and not rae.stats:
        raise ConfigError(f"{stats_needed_by} trains on normalised RAE latents: set rae.stats (compute it with `mfrae stats`)")
    stats = load_latent_stats(resolve_weights(rae.stats)) if rae.stats else None
    decoder = load_vit_decoder(resolve_weights(rae.decoder)) if rae.decoder else None
    return RAE(build_rae_encoder(rae), decoder, stats).to(device).eval()


def to_device(batch, device: torch.device) -> tuple[Tensor, Tensor]:
    x, y = batch
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@dataclass
class LatentInputs:
    """What a latent stage trains on: the dataset, batch -> (normalised latents, labels), the latent shape."""

    dataset: Dataset
    prepare: Callable[[Any, torch.device], tuple[Tensor, Tensor]]
    shape: tuple[int, int, int]


def latent_inputs(data: DataConfig, rae: RAE, fail_on_bad_images: bool = False) -> LatentInputs:
    """Images encoded on the fly, or raw latents read from a cache made by `mfrae cache` (normalised here)."""
    if data.kind == "latents":
        # The cache must come from this very encoder: the dataset checks its fingerprint.
        options = {"expected_fingerprint": data.options.get("expected_fingerprint", rae.encoder.fingerprint())}
        dataset = build_data(data, fail_on_bad_images, **options)
        shape = tuple(dataset[0][0].shape)
        if shape != rae.latent_shape:
            raise ConfigError(f"latent cache holds {shape} latents, the configured RAE makes {rae.latent_shape}")

        def prepare_cached(batch, device):
            latents, labels = to_device(batch, device)
            return rae.stats.normalize(latents.float()), labels

        return LatentInputs(dataset, prepare_cached, shape)

    dataset = build_data(data, fail_on_bad_images)

    @torch.no_grad()
    def prepare(batch, device):
        images, labels = to_device(batch, device)
        return rae.encode(images), labels

    return LatentInputs(dataset, prepare, rae.latent_shape)
