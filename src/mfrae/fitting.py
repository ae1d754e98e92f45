"""Fitting a small model on tensors in memory: AdamW, linear warm-up + cosine decay, epoch-shuffled minibatches.

For the few networks trained outside the `mfrae.train` engine, whose data fits in memory and that need no
checkpoints, loader or devices: the toy MeanFlow MLP (`mfrae.flow.toy`), the small ViT encoder
(`mfrae.train.small_encoder`) and the digits judge (`mfrae.eval.judge`).

    for step in range(steps):
        batch = next minibatch of `data`     (a fresh permutation from `generator` each epoch)
        loss = loss_fn(step, *batch)
        lr <- warmup_cosine(step, ...)
        zero grads; loss.backward(); clip the gradient norm (optional); AdamW step; after_step(step)

AdamW is Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (arXiv 1711.05101); with
weight_decay = 0 it is Adam (Kingma & Ba, arXiv 1412.6980), update for update. The cosine decay is that of
SGDR (Loshchilov & Hutter, arXiv 1608.03983) without restarts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor


def warmup_cosine(step: int, steps: int, lr: float, warmup: int = 0, final_fraction: float = 0.0) -> float:
    """The learning rate at `step` (0-based) of a run of `steps`.

    Linear warm-up over the first `warmup` steps, lr * (step + 1) / warmup, then a cosine decay from lr at
    step = warmup towards final_fraction * lr at step = steps:

        lr * (f + (1 - f) * (1 + cos(pi * (step - warmup) / (steps - warmup))) / 2)
    """
    if step < warmup:
        return lr * ((step + 1) / warmup)
    angle = math.pi * (step - warmup) / max(1, steps - warmup)
    return lr * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(angle)))


def epoch_batches(n: int, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Tensor]:
    """Endless minibatches of indices into range(n): each epoch a fresh permutation drawn from `generator`
    (when the first batch is requested, then whenever the next batch would run past the end), cut into
    consecutive batches of `batch_size`. The last partial batch of an epoch is dropped; with
    batch_size >= n every batch is one whole permutation."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    order, cursor = torch.randperm(n, generator=generator), 0
    while True:
        if cursor + batch_size > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        yield order[cursor : cursor + batch_size]
        cursor += batch_size


def fit(
    params: Iterable[Tensor],
    loss_fn: Callable[..., Tensor],
    *,
    steps: int,
    lr: float,
    data: Sequence[Tensor] = (),
    batch_size: int = 1,
    generator: torch.Generator | None = None,
    warmup: int = 0,
    final_lr_fraction: float = 0.0,
    weight_decay: float = 0.0,
    decay_1d: bool = True,
    betas: tuple[float, float] = (0.9, 0.999),
    grad_clip: float | None = None,
    after_step: Callable[[int], None] | None = None,
    progress: str | None = None,
) -> list[float]:
    """Minimise `loss_fn` over `params` for `steps` AdamW steps; returns the loss of every step.

    Args:
        params: the tensors to optimise (in a fixed order: it is the order of the gradient-norm sum).
        loss_fn: `loss_fn(step, *batch)` -> scalar loss, where batch = tuple(t[index] for t in data) for the
            step's minibatch `index` (`epoch_batches`); without `data`, `loss_fn(step)` (it draws its own).
        data: tensors sharing their first dimension (e.g. images and labels), indexed together.
        batch_size, generator: the minibatch size and the generator of the epoch permutations (when `data`
            is given). The caller may draw augmentation from the same generator inside `loss_fn`.
        warmup, final_lr_fraction: the learning rate of each step is `warmup_cosine(step, steps, lr, warmup,
            final_lr_fraction)`.
        weight_decay, decay_1d, betas: AdamW's options; decay_1d=False exempts 1-D tensors (biases, norm
            gains) from the decay.
        grad_clip: clip the total gradient norm to this value before each step (None: no clipping).
        after_step: called with the step index after each optimizer step (e.g. an EMA update).
        progress: the description of a tqdm progress bar (None: no bar).
    """
    if steps < 1 or not lr > 0:
        raise ValueError(f"need steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
    params = list(params)
    if decay_1d or not weight_decay:
        groups: list = params
    else:
        groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    batches = epoch_batches(data[0].shape[0], batch_size, generator) if data else None
    bar = None
    if progress is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=progress, dynamic_ncols=True, leave=True)
    losses: list[float] = []
    for step in range(steps):
        if batches is None:
            loss = loss_fn(step)
        else:
            index = next(batches)
            loss = loss_fn(step, *(t[index] for t in data))
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, steps, lr, warmup, final_lr_fraction)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        if after_step is not None:
            after_step(step)
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            if step % 20 == 0 or step == steps - 1:
                recent = losses[-20:]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", refresh=False)
    if bar is not None:
        bar.close()
    return losses
