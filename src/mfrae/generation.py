"""Generation: labels, per-index noise and batches of images from a teacher (ODE) or MeanFlow model + RAE decoder.

    MeanFlow:  z <- z - (t_i - t_{i+1}) u(z, t_{i+1}, t_i) on the uniform grid of `steps` jumps or an explicit
               grid (MeanFlow arXiv 2505.13447, Eq. 12)
    teacher:   Euler / Heun on the shifted grid, `steps` network evaluations, optional CFG (arXiv 2207.12598)
               or AutoGuidance (arXiv 2406.02507)
    images  =  clamp(RAE.decode(z), 0, 1)   (RAE arXiv 2510.11690)

Determinism: the noise of sample i is drawn on the CPU from its own generator seeded with
`seed * 1_000_003 + i` (distinct for i < 1_000_003) and then moved to the device, so it does not depend on the
device, the batch or the process that makes sample i. Used by `mfrae sample` (streamed to shards), the demo,
the benchmarks and evaluation during training.

Non-finite values (NaN weights or statistics, a guidance scale that overflows) would come out as black images,
because the uint8 conversion clamps them away; `generate_batch(..., check_finite=True)` (what `mfrae sample`
asks for) raises `NonFiniteSamples` instead, saying whether the latents or only the decoded images went bad.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from mfrae.flow.paths import dimension_shift
from mfrae.flow.samplers import flow_matching_sample, meanflow_sample
from mfrae.models.dit_dh import DiTDH
from mfrae.models.rae import RAE

NOISE_SEED_STRIDE = 1_000_003


class NonFiniteSamples(ValueError):
    """A batch holds NaN or infinite values; `stage` is "latents" (the backbone or its guidance produced them)
    or "images" (the latents were finite: the decoder or the latent statistics produced them)."""

    def __init__(self, stage: str, indices: Sequence[int]) -> None:
        self.stage = stage
        first, last = int(indices[0]), int(indices[-1])
        what = "sampled latents" if stage == "latents" else "decoded images (of finite latents)"
        super().__init__(f"{what} are not finite in samples {first}..{last}")


#################################################################################
#                            Settings and labels                                #
#################################################################################


@dataclass
class SampleSettings:
    """How to sample: the sampler's grid and guidance, the batch size and the autocast regions."""

    steps: int = 1
    batch_size: int = 64
    shift: float | None = None  # teacher ODE grid shift; None: sqrt(C H W / 4096)
    method: str = "euler"
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    autoguidance_scale: float = 1.0
    decoder_bf16: bool = False
    grid: tuple[float, ...] | None = None  # explicit MeanFlow time grid (1 > ... > 0); overrides `steps`
    bf16: bool = False  # the backbone (and any guidance model) under bf16 autocast


def class_labels(spec: str, num: int, num_classes: int, seed: int) -> Tensor:
    """"equal" (num / num_classes per class, shuffled), "random", or a comma list cycled to `num`.

    Label i depends on (spec, num, num_classes, seed) only: every process computes the whole list and takes its
    samples' entries."""
    generator = torch.Generator().manual_seed(seed)
    if spec == "equal":
        labels = torch.arange(num) % num_classes
        return labels[torch.randperm(num, generator=generator)]
    if spec == "random":
        return torch.randint(0, num_classes, (num,), generator=generator)
    try:
        values = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--labels must be 'equal', 'random' or a comma list of class ids, got {spec!r}") from None
    bad = [v for v in values if not 0 <= v <= num_classes]
    if not values or bad:
        raise ValueError(f"--labels: class ids must be in [0, {num_classes}] ({num_classes} = null), got {spec!r}")
    return torch.tensor(values).repeat(math.ceil(num / len(values)))[:num]


#################################################################################
#                           Noise and generation                                #
#################################################################################


def sample_noise(shape: tuple[int, ...], indices: Sequence[int], seed: int) -> Tensor:
    """Noise [len(indices), *shape] on the CPU; row j from its own generator seeded `seed * 1_000_003 + indices[j]`,
    so it is the same on every device and for every batch that holds the index."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * NOISE_SEED_STRIDE + int(i)))
                        for i in indices])


def prefetched_noise(shape: tuple[int, ...], pieces: Sequence[Sequence[int]], seed: int,
                     prefetch: bool = True) -> Iterator[Tensor]:
    """`sample_noise` of each piece in turn; with `prefetch` the next piece is drawn in a thread meanwhile.

    Drawing on the CPU costs about a millisecond per ImageNet-256 latent, as much as a 1-step batch on a GPU; in a
    thread it overlaps the device's work on the current batch. The noise is the same either way."""
    if not prefetch:
        yield from (sample_noise(shape, piece, seed) for piece in pieces)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="noise") as pool:
        ahead = None
        for piece in [*pieces, None]:  # submit piece i + 1, then hand out piece i
            current, ahead = ahead, None if piece is None else pool.submit(sample_noise, shape, piece, seed)
            if current is not None:
                yield current.result()


def batches(indices: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    """Consecutive pieces of at most `size` indices (a range gives ranges)."""
    for start in range(0, len(indices), size):
        yield indices[start : start + size]


@torch.inference_mode()
def generate_batch(model: DiTDH, rae: RAE, labels: Tensor, indices: Sequence[int], settings: SampleSettings,
                   seed: int = 0, weak_model: DiTDH | None = None, device: torch.device | str = "cpu",
                   noise: Tensor | None = None, check_finite: bool = False) -> Tensor:
    """Images [len(indices), 3, H, W] in [0, 1] on the CPU for samples `indices`, whose labels are `labels`
    (`noise`: their `sample_noise`, when drawn already). `check_finite`: raise `NonFiniteSamples` for NaN or
    infinite latents or images instead of returning them clamped."""
    device = torch.device(device)
    noise = sample_noise(model.latent_shape, indices, seed) if noise is None else noise
    noise = noise.to(device, non_blocking=True)
    y = labels.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16):
        if model.is_meanflow:
            z = meanflow_sample(model, noise, y, steps=list(settings.grid) if settings.grid else settings.steps)
        else:
            shift = settings.shift if settings.shift is not None else dimension_shift(model.latent_shape)
            z = flow_matching_sample(model, noise, y, num_points=settings.steps + 1, shift=shift,
                                     method=settings.method, cfg_scale=settings.cfg_scale,
                                     cfg_interval=settings.cfg_interval, weak_model=weak_model,
                                     autoguidance_scale=settings.autoguidance_scale)
    if check_finite and not torch.isfinite(z).all():
        raise NonFiniteSamples("latents", indices)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.decoder_bf16):
        images = rae.decode(z.float()).float()
    if check_finite and not torch.isfinite(images).all():
        raise NonFiniteSamples("images", indices)
    return images.clamp(0, 1).cpu()


def generate_indices(model: DiTDH, rae: RAE, labels: Tensor, indices: Sequence[int] | Tensor, settings: SampleSettings,
                     seed: int = 0, device: torch.device | str = "cpu", weak_model: DiTDH | None = None) -> Tensor:
    """Images [len(indices), 3, H, W] for the samples `indices` (a non-empty subset of range(len(labels)), in any
    order) of the set whose labels are `labels`, in batches of `settings.batch_size`."""
    indices = [int(i) for i in indices]
    return torch.cat([generate_batch(model, rae, labels[list(b)], b, settings, seed, weak_model, device)
                      for b in batches(indices, settings.batch_size)])


def generate(model: DiTDH, rae: RAE, labels: Tensor, settings: SampleSettings, seed: int = 0,
             weak_model: DiTDH | None = None, device: torch.device | str = "cpu") -> Tensor:
    """Images [N, 3, H, W] in [0, 1] for `labels` (sample i has label i), in memory; `mfrae sample` streams instead."""
    return generate_indices(model, rae, labels, range(len(labels)), settings, seed, device, weak_model)
