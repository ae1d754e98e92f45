"""Learning-rate schedules and the exponential moving average of the weights, shared by every stage."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from mfrae.train.config import OptimConfig


def learning_rate(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """Warm-up from 0, constant until `decay_start`, then linear / cosine to `final_lr` at `decay_end`."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or step < cfg.decay_start:
        return cfg.lr
    end = cfg.decay_end if cfg.decay_end is not None else total_steps
    frac = min(1.0, (step - cfg.decay_start) / max(1, end - cfg.decay_start))
    if cfg.schedule == "linear":
        return cfg.lr + (cfg.final_lr - cfg.lr) * frac
    return cfg.final_lr + 0.5 * (cfg.lr - cfg.final_lr) * (1 + math.cos(math.pi * frac))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class EMA:
    """Exponential moving average of a model's weights, initialised to the model: p_ema <- d p_ema + (1 - d) p."""

    def __init__(self, model: nn.Module):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        # Frozen tensors (pos-emb tables, Fourier frequencies, buffers) are equal in both copies already.
        self._pairs = [(e, p) for e, p in zip(self.model.parameters(), model.parameters()) if p.requires_grad]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        ema, live = [e for e, _ in self._pairs], [p.detach() for _, p in self._pairs]
        torch._foreach_lerp_(ema, live, 1.0 - decay)
