"""Class-conditional image folders in the ImageNet layout, decoded with Pillow.

Layout: `root/<class name>/**/<image>.{jpg,jpeg,png,webp,bmp}` (extension case-insensitive). Class folders
are sorted by name and numbered 0..K-1; folders whose name starts with "." are ignored. Files inside a class
folder are found recursively and sorted by relative path, so the item order is a pure function of the tree.

Unreadable images. Anything Pillow raises while opening or decoding a file (unidentified format, truncated
data, a missing file, `Image.DecompressionBombError`) and images larger than `Image.MAX_IMAGE_PIXELS`
(Pillow only warns between 1x and 2x that limit; here the warning counts as a failure) make the file bad:

* `on_error="skip"` (default): the item is replaced by the next readable index (index+1, index+2, ...,
  wrapping around), so the replacement is deterministic; the flip coin still belongs to the requested index.
  The path and reason are stored in `dataset.bad_files` (a dict path -> reason, of this process only) and
  returned by `load()`. With DataLoader workers each worker holds its own copy of the dataset, so the
  counts in the main process's `dataset.bad_files` stay empty; `make_loader` instead carries the (path,
  reason) pairs of every batch through its collate function back to the main process, where
  `loader.bad_files` gathers them (see `mfrae.data.loader`).
* `on_error="raise"`: a `DataError` naming the file and Pillow's message stops the run.

16-bit grey images (Pillow mode "I;16" or "I") are scaled to 8 bits (`mfrae.images.rgb8`), not clipped as
Pillow's `convert("RGB")` would clip them.

Note: if `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` was set to True elsewhere, Pillow pads truncated files
silently instead of raising, and they are no longer detected here.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from mfrae.images import rgb8

from .common import BadFiles, DataError, EpochItems, Item, check_choice, check_positive_int, flip_coin
from .transforms import center_crop_arr, uint8_to_tensor

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
ON_ERROR_CHOICES = ("skip", "raise")


class UnreadableImage(Exception):
    """Internal: a file that Pillow could not turn into an RGB image; the message is the reason."""


def scan_image_folder(
    root: str | os.PathLike, extensions: tuple[str, ...] = IMAGE_EXTENSIONS
) -> tuple[list[str], list[str], list[int]]:
    """Return (class names, image paths relative to root, labels), all in the dataset's fixed order."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"image folder {root} is not a directory")
    exts = tuple(e.lower() for e in extensions)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(
            f"image folder {root} has no class sub-folders; expected the ImageNet layout root/<class>/<image>"
        )

    rel_paths: list[str] = []
    labels: list[int] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        found: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = os.path.relpath(dirpath, root)
            found.extend(os.path.join(rel_dir, f) for f in filenames if f.lower().endswith(exts))
        if not found:
            empty.append(name)
        found.sort()
        rel_paths.extend(found)
        labels.extend([label] * len(found))
    if empty:
        shown = ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else "")
        raise DataError(
            f"image folder {root}: {len(empty)} class folder(s) contain no image "
            f"({'/'.join(exts)}): {shown}; remove them or add images"
        )
    return classes, rel_paths, labels


def decode_image(path: str, image_size: int) -> np.ndarray:
    """Open `path` with Pillow, convert to 8-bit RGB and ADM-center-crop it; raise UnreadableImage on any failure."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; treat it as a bad file too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                rgb = Image.fromarray(rgb8(image, path))  # forces the full decode, so truncation surfaces here
    except MemoryError:
        raise
    except Exception as exc:  # any decoder failure means this file is unusable, whatever its type
        raise UnreadableImage(f"{type(exc).__name__}: {exc}") from exc
    return center_crop_arr(rgb, image_size)


class ImageFolderDataset(EpochItems, Dataset):
    """ImageNet-layout folder -> items (float32 [3, image_size, image_size] in [0, 1], int label).

    Args:
        root: folder with one sub-folder per class.
        image_size: output side after the ADM center crop.
        random_flip: mirror left-right with probability 1/2, decided by `flip_coin(seed, epoch, index)`.
        on_error: "skip" (replace by the next readable image, record in `bad_files`) or "raise".
        seed: flip seed used by `__getitem__`; the loader passes its own seed through `load()` instead.
        extensions: accepted file suffixes, compared case-insensitively.

    `__getitem__(i)` uses `self.epoch` (set with `set_epoch`) and `self.seed`; `load(i, epoch, seed)` is the
    stateless form the resumable loader uses.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int,
        random_flip: bool = True,
        on_error: str = "skip",
        seed: int = 0,
        extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
    ) -> None:
        check_choice("on_error", on_error, ON_ERROR_CHOICES)
        check_positive_int("image_size", image_size)
        self.root = Path(root)
        self.image_size = int(image_size)
        self.random_flip = bool(random_flip)
        self.on_error = on_error
        self.seed = int(seed)
        self.epoch = 0
        self.classes, rel_paths, labels = scan_image_folder(self.root, extensions)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        # Paths live in one numpy bytes array rather than a list of str: forked DataLoader workers then share
        # the pages instead of copying them as Python refcounts are touched (matters at ImageNet scale).
        self._rel_paths = np.array([os.fsencode(p) for p in rel_paths], dtype=np.bytes_)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.bad_files: dict[str, str] = {}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, index: int) -> str:
        """Full path of item `index`."""
        return os.path.join(self.root, os.fsdecode(self._rel_paths[index]))

    def _items_description(self) -> str:
        return f"images in {self.root}"

    def load(self, index: int, epoch: int, seed: int) -> tuple[Item, BadFiles]:
        """Item `index` for (epoch, seed) plus the (path, reason) pairs of bad files skipped to produce it."""
        n = len(self)
        bad: list[tuple[str, str]] = []
        for step in range(n):
            j = (index + step) % n
            path = self.path(j)
            known = self.bad_files.get(path)
            if known is not None:  # already failed in this process: do not decode it again
                bad.append((path, known))
                continue
            try:
                arr = decode_image(path, self.image_size)
            except UnreadableImage as exc:
                if self.on_error == "raise":
                    raise DataError(f"cannot read image {path}: {exc}") from exc
                self.bad_files[path] = str(exc)
                bad.append((path, str(exc)))
                continue
            if self.random_flip and flip_coin(seed, epoch, index):
                arr = arr[:, ::-1]
            return (uint8_to_tensor(arr), int(self.labels[j])), tuple(bad)
        raise DataError(f"no readable images in {self.root} ({n} skipped; e.g. {bad[0][0]}: {bad[0][1]})")

    def __repr__(self) -> str:
        return (
            f"ImageFolderDataset(root={str(self.root)!r}, images={len(self)}, classes={self.num_classes}, "
            f"image_size={self.image_size}, random_flip={self.random_flip}, on_error={self.on_error!r})"
        )
