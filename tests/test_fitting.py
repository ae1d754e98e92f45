"""mfrae.fitting against independent truth: least squares in closed form, the schedule formula, AdamW's update
for a constant gradient and for decay alone, and epoch shuffling that visits every sample once per epoch."""

from __future__ import annotations

import math

import pytest
import torch

from mfrae.fitting import epoch_batches, fit, warmup_cosine

pytestmark = pytest.mark.usefixtures("one_thread")


def _regression(n: int = 96, d: int = 3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.5, -2.0, 0.5], dtype=torch.float64) + 0.3 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    design = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, y[:, None]).solution.flatten()  # [w, b], the normal equations' solution
    return x, y, solution


@pytest.mark.parametrize("batch_size,atol", [(96, 1e-6), (16, 2e-2)])
def test_fits_linear_regression_to_the_least_squares_solution(batch_size, atol):
    x, y, solution = _regression()
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)

    def loss_fn(step, xb, yb):
        return ((xb @ w + b - yb) ** 2).mean()

    losses = fit([w, b], loss_fn, steps=1500, lr=0.05, data=(x, y), batch_size=batch_size,
                 generator=torch.Generator().manual_seed(1), warmup=20)
    assert len(losses) == 1500 and losses[-1] < losses[0]
    torch.testing.assert_close(torch.cat([w.detach(), b.detach()[None]]), solution, atol=atol, rtol=0)


def test_schedule_follows_the_formula():
    lr, steps, warmup, f = 0.01, 110, 10, 0.05
    assert warmup_cosine(0, steps, lr, warmup, f) == pytest.approx(lr / 10)
    assert warmup_cosine(4, steps, lr, warmup, f) == pytest.approx(lr / 2)
    assert warmup_cosine(9, steps, lr, warmup, f) == pytest.approx(lr)
    assert warmup_cosine(10, steps, lr, warmup, f) == pytest.approx(lr)  # the decay starts at lr
    assert warmup_cosine(60, steps, lr, warmup, f) == pytest.approx(lr * (f + (1 - f) / 2))  # half-way: cos = 0
    assert warmup_cosine(steps, steps, lr, warmup, f) == pytest.approx(lr * f)  # the floor, reached at `steps`
    assert warmup_cosine(0, 100, lr) == pytest.approx(lr)  # no warm-up
    values = [warmup_cosine(s, steps, lr, warmup, 0.0) for s in range(warmup, steps)]
    assert all(a > b for a, b in zip(values, values[1:])) and values[-1] > 0


def test_each_step_moves_by_the_scheduled_learning_rate():
    # Adam on a constant gradient g: m_hat = g and v_hat = g^2 exactly, so each step moves by lr_t g / (|g| + eps).
    p = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    direction = torch.tensor([3.0, -0.5], dtype=torch.float64)
    seen = []
    steps, lr = 30, 0.1
    fit([p], lambda step: (p * direction).sum(), steps=steps, lr=lr, warmup=5, final_lr_fraction=0.1,
        after_step=lambda step: seen.append(p.detach().clone()))
    moves = torch.diff(torch.stack([torch.zeros(2, dtype=torch.float64), *seen]), dim=0)
    for step in range(steps):
        expected = -warmup_cosine(step, steps, lr, 5, 0.1) * direction / (direction.abs() + 1e-8)
        torch.testing.assert_close(moves[step], expected, rtol=1e-9, atol=0)


def test_decoupled_weight_decay_and_the_1d_exemption():
    # Zero gradient: Adam's step is 0, so AdamW only shrinks the weights by (1 - lr_t * wd) per step.
    matrix = torch.ones(2, 2, dtype=torch.float64, requires_grad=True)
    vector = torch.ones(2, dtype=torch.float64, requires_grad=True)
    steps, lr, wd = 20, 0.1, 0.5
    for decay_1d in (True, False):
        with torch.no_grad():
            matrix.fill_(1.0)
            vector.fill_(1.0)
        fit([matrix, vector], lambda step: 0.0 * (matrix.sum() + vector.sum()), steps=steps, lr=lr, warmup=3,
            weight_decay=wd, decay_1d=decay_1d)
        shrink = math.prod(1 - warmup_cosine(s, steps, lr, 3) * wd for s in range(steps))
        torch.testing.assert_close(matrix.detach(), torch.full((2, 2), shrink, dtype=torch.float64))
        torch.testing.assert_close(vector.detach(), torch.full((2,), shrink if decay_1d else 1.0, dtype=torch.float64))


@pytest.mark.parametrize("n,batch_size", [(12, 4), (10, 3)])
def test_every_epoch_visits_each_sample_at_most_once(n, batch_size):
    per_epoch = n // batch_size
    seen = []
    p = torch.zeros((), requires_grad=True)

    def loss_fn(step, index):
        seen.append(index.clone())
        return p * 0.0

    fit([p], loss_fn, steps=5 * per_epoch, lr=1e-3, data=(torch.arange(n),), batch_size=batch_size,
        generator=torch.Generator().manual_seed(0))
    assert all(len(b) == batch_size for b in seen)
    epochs = [torch.cat(seen[e * per_epoch:(e + 1) * per_epoch]) for e in range(5)]
    for epoch in epochs:
        assert len(set(epoch.tolist())) == per_epoch * batch_size  # no sample twice within an epoch
        if n % batch_size == 0:
            assert sorted(epoch.tolist()) == list(range(n))  # ... and every sample once
    assert len({tuple(e.tolist()) for e in epochs}) == 5  # a fresh order each epoch


def test_batches_are_reproducible_and_cover_the_data():
    a = epoch_batches(7, 3, torch.Generator().manual_seed(5))
    b = epoch_batches(7, 3, torch.Generator().manual_seed(5))
    for _ in range(10):
        torch.testing.assert_close(next(a), next(b))
    whole = next(epoch_batches(5, 8, torch.Generator().manual_seed(0)))  # batch larger than the data
    assert sorted(whole.tolist()) == list(range(5))
    with pytest.raises(ValueError, match="batch_size"):
        next(epoch_batches(5, 0))


def test_bad_arguments_are_named():
    p = torch.zeros((), requires_grad=True)
    with pytest.raises(ValueError, match="steps"):
        fit([p], lambda step: p * 1.0, steps=0, lr=0.1)
    with pytest.raises(ValueError, match="lr"):
        fit([p], lambda step: p * 1.0, steps=1, lr=0.0)
