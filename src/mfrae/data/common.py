"""Pieces shared by every dataset: the error type, per-item randomness, the keyed-load protocol and
`stack_dataset` (a small dataset as two tensors).

Why keyed loads: resuming a killed run bit-exactly needs every random choice of the data pipeline to be a
pure function of (seed, epoch, index). The loader therefore sends each worker the key (epoch, index) with the
index, and datasets draw their augmentation randomness from a generator derived from (seed, epoch, index)
instead of the global RNG, whose state differs per worker process and per restart.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

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


def check_positive_int(name: str, value: object) -> None:
    """Raise DataError naming the option when `value` is not a positive integer (1, 2.0, ... pass)."""
    if int(value) != value or value < 1:  # type: ignore[call-overload, operator]
        raise DataError(f"{name} must be a positive integer, got {value!r}")


def hflip(x: Tensor) -> Tensor:
    """Mirror a [..., H, W] tensor left-right (a copy, so the result is contiguous)."""
    return torch.flip(x, dims=(-1,))


class EpochItems:
    """Mixin for datasets built on `load(index, epoch, seed)`: indexing with the dataset's own epoch and seed.

    `ds[i]` (negative i counts from the end) is `ds.load(i mod len, ds.epoch, ds.seed)` without the bad-file
    pairs; `set_epoch` sets the epoch it uses for the flip coin. The class provides `seed`, `epoch`,
    `__len__`, `load` and `_items_description()`, the words after the count in the IndexError message
    (e.g. "images in /data/train").
    """

    seed: int
    epoch: int

    def _items_description(self) -> str:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Epoch used by `__getitem__` for the flip coin."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> Item:
        n = len(self)  # type: ignore[arg-type]
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} {self._items_description()}")
        item, _ = self.load(index % n, self.epoch, self.seed)  # type: ignore[attr-defined]
        return item


@runtime_checkable
class KeyedDataset(Protocol):
    """A map-style dataset whose items can be loaded for an explicit (epoch, seed) and report bad files.

    `load(index, epoch, seed)` returns `(item, bad_files)`: the item for `index` (or its deterministic
    replacement when the file is unreadable) and the (path, reason) pairs of files skipped to produce it.
    It must not depend on any state that differs between worker processes.
    """

    def __len__(self) -> int: ...

    def load(self, index: int, epoch: int, seed: int) -> tuple[Item, BadFiles]: ...


def stack_dataset(dataset: Any, name: str = "dataset") -> tuple[Tensor, Tensor]:
    """All items of a small in-memory dataset of (image [3, H, W] in [0, 1], int label) as two tensors.

    Returns float32 images [N, 3, H, W] and int64 labels [N]. Meant for the bundled digits (1797 images);
    reading every item is fine at that size."""
    n = len(dataset)
    if n == 0:
        raise ValueError(f"{name} is empty")
    images, labels = [], []
    for i in range(n):
        item = dataset[i]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ValueError(f"{name}[{i}] must be an (image, label) pair, got {type(item).__name__}")
        image, label = item
        if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"{name}[{i}]: expected an image tensor [3, H, W], got "
                             f"{tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__}")
        images.append(image.float())
        labels.append(int(label))
    try:
        stacked = torch.stack(images)
    except RuntimeError as err:
        raise ValueError(f"{name}: images differ in size ({err})") from None
    return stacked, torch.tensor(labels, dtype=torch.int64)
