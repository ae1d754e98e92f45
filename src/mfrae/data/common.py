"""Pieces shared by every dataset: the error type, per-item randomness and the keyed-load protocol.

Why keyed loads: resuming a killed run bit-exactly needs every random choice of the data pipeline to be a
pure function of (seed, epoch, index). The loader therefore sends each worker the key (epoch, index) with the
index, and datasets draw their augmentation randomness from a generator derived from (seed, epoch, index)
instead of the global RNG, whose state differs per worker process and per restart.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

# One sample as datasets return it: (image or latent tensor, integer class label).
Item = tuple[Tensor, int]
# Unreadable files met while producing one item: (path, reason) pairs, usually empty.
BadFiles = tuple[tuple[str, str], ...]

# Domain tags keep the streams for different purposes independent even when the integers coincide.
DOMAIN_PERMUTATION = 0x5EED_0001
DOMAIN_ITEM = 0x5EED_0002

_U64 = (1 << 64) - 1


class DataError(ValueError):
    """A dataset, image file or latent cache cannot be used; the message names the path and what is wrong."""


def seed_sequence(*words: int) -> np.random.SeedSequence:
    """A numpy SeedSequence over integer words (any sign; each is reduced modulo 2^64)."""
    return np.random.SeedSequence([int(w) & _U64 for w in words])


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for every random choice made while loading item `index` in `epoch` (a pure function)."""
    return np.random.Generator(np.random.PCG64(seed_sequence(DOMAIN_ITEM, seed, epoch, index)))


def flip_coin(seed: int, epoch: int, index: int) -> bool:
    """Fair coin for the horizontal flip of item `index` in `epoch`: the first draw of `item_rng`."""
    return bool(item_rng(seed, epoch, index).random() < 0.5)


def check_choice(name: str, value: object, allowed: tuple[object, ...]) -> None:
    """Raise DataError naming the option when `value` is not one of `allowed`."""
    if value not in allowed:
        raise DataError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, allowed))}")


def hflip(x: Tensor) -> Tensor:
    """Mirror a [..., H, W] tensor left-right (a copy, so the result is contiguous)."""
    return torch.flip(x, dims=(-1,))


@runtime_checkable
class KeyedDataset(Protocol):
    """A map-style dataset whose items can be loaded for an explicit (epoch, seed) and report bad files.

    `load(index, epoch, seed)` returns `(item, bad_files)`: the item for `index` (or its deterministic
    replacement when the file is unreadable) and the (path, reason) pairs of files skipped to produce it.
    It must not depend on any state that differs between worker processes.
    """

    def __len__(self) -> int: ...

    def load(self, index: int, epoch: int, seed: int) -> tuple[Item, BadFiles]: ...
