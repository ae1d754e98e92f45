"""Data layer: image folders, the bundled digits, latent caches and a resumable multi-rank loader.

Every dataset yields (float32 tensor, int label) items and also offers `load(index, epoch, seed)`, the
stateless form used by `make_loader` so that augmentation is a pure function of (seed, epoch, index) and a
killed run resumes bit-exactly (see `mfrae.data.loader` for the order, the position and the bad-file count).

`build_dataset(kind, **options)` builds one by name: "digits" (DigitsDataset), "folder"
(ImageFolderDataset) or "latents" (LatentDataset); unknown kinds or options raise ConfigError naming them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

from ..errors import ConfigError
from .common import DataError, KeyedDataset, flip_coin, item_rng
from .digits import DigitsDataset, digits_split_indices
from .folder import IMAGE_EXTENSIONS, ImageFolderDataset, decode_image, scan_image_folder
from .latents import LatentDataset, build_latent_cache, read_index
from .loader import InfiniteLoader, ResumableSampler, collate_with_bad_files, epoch_permutation, make_loader
from .transforms import center_crop_arr, uint8_to_tensor

DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": DigitsDataset,
    "folder": ImageFolderDataset,
    "latents": LatentDataset,
}


def register_dataset(kind: str, factory: Callable[..., Dataset]) -> None:
    """Make `build_dataset(kind, ...)` call `factory(**options)`."""
    DATASETS[kind] = factory


def build_dataset(kind: str, **options: Any) -> Dataset:
    """Build the dataset registered as `kind` with keyword `options` (the constructor's arguments)."""
    if kind not in DATASETS:
        raise ConfigError(f"dataset kind {kind!r} is unknown; choose one of {', '.join(sorted(DATASETS))}")
    factory = DATASETS[kind]
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(options) - set(params))
        if unknown:
            raise ConfigError(
                f"dataset {kind!r} has no option(s) {', '.join(unknown)}; it accepts {', '.join(params)}"
            )
    missing = [
        name
        for name, p in params.items()
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and name not in options
    ]
    if missing:
        raise ConfigError(f"dataset {kind!r} needs the option(s) {', '.join(missing)}")
    return factory(**options)


__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "DataError",
    "DigitsDataset",
    "ImageFolderDataset",
    "InfiniteLoader",
    "KeyedDataset",
    "LatentDataset",
    "ResumableSampler",
    "build_dataset",
    "build_latent_cache",
    "center_crop_arr",
    "collate_with_bad_files",
    "decode_image",
    "digits_split_indices",
    "epoch_permutation",
    "flip_coin",
    "item_rng",
    "make_loader",
    "read_index",
    "register_dataset",
    "scan_image_folder",
    "uint8_to_tensor",
]
