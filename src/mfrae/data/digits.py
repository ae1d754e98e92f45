"""scikit-learn's bundled handwritten digits (no download) as small RGB images with labels.

`sklearn.datasets.load_digits`: 1797 images of 8x8 pixels with 17 grey levels (0..16, ink = high), 10 classes.
Values are scaled to [0, 1] (v / 16), upsampled with `torch.nn.functional.interpolate` to image_size, clamped
to [0, 1] (bicubic overshoots) and repeated to 3 channels: white digits on black.

Fixed split (`split_seed=0`, `test_fraction=0.2` by default): within each class, the original indices are
permuted by `numpy.random.default_rng(split_seed)` (one generator, classes in order 0..9) and the first
round(test_fraction * class count) go to "test", the rest to "train"; both keep the original order. So the
split is stratified, disjoint and covering (359 test / 1438 train images by default), and a judge classifier
can be fit on "train" and evaluated on "test". `split="all"` keeps all 1797 in the original order.

Flips are off by default because digits are not mirror-invariant.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .common import BadFiles, DataError, EpochItems, Item, check_choice, check_positive_int, flip_coin, hflip

SPLITS = ("train", "test", "all")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
NUM_DIGITS = 1797


def digits_split_indices(labels: np.ndarray, test_fraction: float = 0.2, split_seed: int = 0) -> dict[str, np.ndarray]:
    """Indices (into the original 1797) of the stratified train/test split described in the module docstring."""
    if not 0.0 <= test_fraction <= 1.0:
        raise DataError(f"test_fraction must be in [0, 1], got {test_fraction!r}")
    rng = np.random.default_rng(split_seed)
    test: list[np.ndarray] = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        n_test = int(round(test_fraction * len(members)))
        test.append(rng.permutation(members)[:n_test])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test)] = True
    return {"train": np.flatnonzero(~is_test), "test": np.flatnonzero(is_test), "all": np.arange(len(labels))}


class DigitsDataset(EpochItems, Dataset):
    """Digits as items (float32 [3, image_size, image_size] in [0, 1], int label in 0..9).

    Args:
        image_size: output side (8 keeps the original pixels).
        split: "train", "test" or "all" (see the module docstring for the fixed split).
        random_flip: mirror left-right with probability 1/2 by `flip_coin(seed, epoch, index)`; off by default.
        interpolation: "bilinear" (default), "bicubic" or "nearest" upsampling.
        test_fraction, split_seed: define the split; keep the defaults to compare results across runs.
        seed: flip seed used by `__getitem__` (the loader passes its own seed to `load()`).
    """

    def __init__(
        self,
        image_size: int = 32,
        split: str = "train",
        random_flip: bool = False,
        interpolation: str = "bilinear",
        test_fraction: float = 0.2,
        split_seed: int = 0,
        seed: int = 0,
    ) -> None:
        check_choice("split", split, SPLITS)
        check_choice("interpolation", interpolation, INTERPOLATIONS)
        check_positive_int("image_size", image_size)
        from sklearn.datasets import load_digits  # imported lazily: scikit-learn takes a second to import

        bunch = load_digits()
        all_labels = np.asarray(bunch.target, dtype=np.int64)
        self.indices = digits_split_indices(all_labels, test_fraction, split_seed)[split]
        self.split = split
        self.image_size = int(image_size)
        self.random_flip = bool(random_flip)
        self.seed = int(seed)
        self.epoch = 0
        self.classes = [str(d) for d in range(10)]
        self.labels = all_labels[self.indices]
        self.bad_files: dict[str, str] = {}  # always empty; kept so all datasets look alike

        grey = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32)[self.indices]) / 16.0
        self.images = self._resize(grey[:, None], self.image_size, interpolation)  # [N, 1, S, S]

    @staticmethod
    def _resize(images: Tensor, size: int, mode: str) -> Tensor:
        if images.shape[-1] != size:
            corners = {"align_corners": False} if mode != "nearest" else {}
            images = F.interpolate(images, size=(size, size), mode=mode, **corners)
        return images.clamp_(0.0, 1.0).contiguous()

    @property
    def num_classes(self) -> int:
        return 10

    def __len__(self) -> int:
        return len(self.indices)

    def _items_description(self) -> str:
        return f"digits ({self.split} split)"

    def load(self, index: int, epoch: int, seed: int) -> tuple[Item, BadFiles]:
        """Item `index` for (epoch, seed); digits have no files, so the bad-file list is always empty."""
        image = self.images[index].expand(3, -1, -1)
        image = hflip(image) if self.random_flip and flip_coin(seed, epoch, index) else image.clone()
        return (image, int(self.labels[index])), ()

    def __repr__(self) -> str:
        return f"DigitsDataset(split={self.split!r}, images={len(self)}, image_size={self.image_size})"
