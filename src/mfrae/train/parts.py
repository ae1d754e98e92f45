"""The written contract between a stage and the training engine.

A stage builder (`mfrae.train.stages`) turns a `TrainConfig` into `StageParts`; the engine
(`mfrae.train.engine`) trains whatever it receives and imports nothing from the stage registry. Everything a
stage may add to the plain "network + objective + data" loop is a named, typed field here, never an attribute
the engine has to discover:

    net          the trained network (the engine owns its optimizer, EMA, DDP wrapper and checkpoints)
    objective    objective(net, x, y, step, part) -> per-sample losses [B]  (`Objective`)
    dataset      what the loader draws from
    prepare      loader batch -> (x, y) on the device (e.g. images -> normalised RAE latents)
    preview      EMA network -> an image grid from fixed noise, or None
    players      further networks trained in turns with `net` (the decoder's GAN discriminator): each has its
                 own optimizer, learning-rate factor, start step and checkpoint entry, all owned by the engine
    objective_config  the objective's options as resolved by the builder (defaults, time shift, horizon),
                 recorded in the run directory's config.yaml; builders never write into the config they read
    log_stats    optional: extra scalars of the last objective call (e.g. the decoder's L1 / perceptual terms)
    evaluate     optional: evaluate(ema_net, step) -> {name: value}, called on every process at the steps
                 `eval.every` names; the values join that step's record in metrics.jsonl
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from mfrae.distributed import BatchPart


class Objective(Protocol):
    """A training loss, EDM style: per-sample losses of `net` on the batch (x, y) at optimizer step `step`.

    `net` is the trained network as the engine calls it (possibly wrapped by DDP / torch.compile; an objective
    that must call it unwrapped uses `mfrae.distributed.plain_module`). `part` says which micro-batch of the
    step's global batch (x, y) is, over processes and accumulation; objectives that lay rows out per step
    (MeanFlow's "prefix" layout) use it, the others ignore it. Frozen models, the null class and every option
    are given to the objective at construction.
    """

    def __call__(self, net: nn.Module, x: Tensor, y: Tensor, step: int, part: BatchPart) -> Tensor: ...


@dataclass(frozen=True)
class PlayerOptim:
    """AdamW settings of a player (eps fixed at 1e-8 as in the RAE recipe)."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    eps: float = 1e-8


@dataclass
class Player:
    """A second network trained in turns with the stage's network (the decoder stage's discriminator).

    After each optimizer step of `net`, once `step >= start_step`, the engine
      1. sets the learning rate to `optim.lr * lr_factor(step)`,
      2. makes `module`'s parameters trainable, evaluates `loss(net, x, step)` on the last micro-batch `x`
         (`net` unwrapped: no DDP, no compile), back-propagates, averages the gradients over processes,
      3. steps the player's AdamW and freezes `module` again (outside its turn no gradient reaches it).
    `module` holds exactly the trainable part: its state_dict (with the optimizer's) is checkpointed under
    `name`, and it is broadcast from rank 0 when training starts. `loss` returns (scalar loss, scalar stats);
    both are logged as `{name}_loss` and `{name}_{stat}`, with `{name}_lr`.
    """

    name: str
    module: nn.Module
    loss: Callable[[nn.Module, Tensor, int], tuple[Tensor, dict[str, Tensor]]]
    optim: PlayerOptim
    start_step: int = 0
    lr_factor: Callable[[int], float] | None = None


@dataclass
class StageParts:
    net: nn.Module
    objective: Objective
    dataset: Dataset
    prepare: Callable[[Any, torch.device], tuple[Tensor, Tensor]]
    preview: Callable[[nn.Module, torch.Generator, int], Tensor | None] | None = None
    players: list[Player] = field(default_factory=list)
    objective_config: dict = field(default_factory=dict)
    log_stats: Callable[[], dict[str, Tensor]] | None = None
    evaluate: Callable[[nn.Module, int], dict[str, float]] | None = None
