"""Shards of `mfrae sample`: fixed index ranges written atomically, and ADM .npz files written in pieces.

An output folder of `mfrae sample` holds

    DIR/plan.json                  the settings that determine the images, and the shard size
    DIR/shards/shard_000000.npz    samples [0, S): `arr_0` uint8 NHWC, `arr_1` int64 labels; shard k is [kS, (k+1)S)
    DIR/samples.npz                every shard in index order, in the ADM evaluator's layout

Shards are index ranges of a fixed size, independent of the batch size and of the number of processes, so a run
resumed with other settings of either finds the same shards. A shard is streamed to a temporary name batch by
batch, flushed and renamed into place (`mfrae.fileio`), so a file under a shard's final name is complete; a
resumed run checks each one's headers and sizes anyway and redoes any that fail.

`write_adm_npz` writes an uncompressed .npz (what `numpy.savez` writes) from an iterable of (images, labels)
pieces: the image array's header first, then each piece's bytes, then the labels. Host memory is one piece,
whatever the number of images (50k ImageNet-256 samples are 9.8 GB of uint8). Zip entries carry a fixed
timestamp, so the same images give the same bytes.
"""

from __future__ import annotations

import itertools
import math
import os
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mfrae.fileio import commit, temp_path

SHARDS = "shards"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest zip timestamp: deterministic bytes
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


#################################################################################
#                           .npz written in pieces                              #
#################################################################################


def _member(archive: zipfile.ZipFile, name: str):
    return archive.open(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME), "w", force_zip64=True)


def _write_header(fh, shape: tuple[int, ...], dtype: np.dtype) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(fh, header)


def write_adm_npz(path: Path, num: int, pieces: Iterable[tuple[np.ndarray, np.ndarray]]) -> Path:
    """Write `num` images given as (uint8 [n, H, W, 3], labels [n]) pieces to `path` as `arr_0` / `arr_1`.

    Atomic (temporary name, fsync, rename); only one piece and the int64 labels are held in memory. When a piece
    fails (e.g. non-finite samples), the temporary file is removed and an existing `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pieces = iter(pieces)
    first = next(pieces)
    tmp = temp_path(path)
    try:
        _write_pieces(tmp, path, num, first, pieces)
        return commit(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.filename:
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err  # a failed write() names no file: name it
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_pieces(tmp: Path, path: Path, num: int, first: tuple[np.ndarray, np.ndarray],
                  pieces: Iterable[tuple[np.ndarray, np.ndarray]]) -> None:
    shape = (num, *first[0].shape[1:])
    labels, written = [], 0
    with open(tmp, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with _member(archive, "arr_0") as member:
            _write_header(member, shape, np.uint8)
            for images, y in itertools.chain([first], pieces):
                if images.dtype != np.uint8 or images.shape[1:] != shape[1:] or len(y) != len(images):
                    raise ValueError(f"{path}: a piece of {images.dtype} {images.shape} with {len(y)} labels "
                                     f"does not fit uint8 {shape[1:]} images")
                member.write(memoryview(np.ascontiguousarray(images)).cast("B"))
                labels.append(np.asarray(y, dtype=np.int64))
                written += len(images)
        if written != num:
            raise ValueError(f"{path}: expected {num} images, got {written}")
        with _member(archive, "arr_1") as member:
            all_labels = np.concatenate(labels)
            _write_header(member, all_labels.shape, all_labels.dtype)
            member.write(memoryview(all_labels).cast("B"))


def npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The array shapes of an .npz from its headers alone; raises ValueError for a damaged or truncated file."""
    try:
        with zipfile.ZipFile(path) as archive:
            shapes = {}
            for info in archive.infolist():
                with archive.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    shape, _, dtype = _HEADER_READERS[version](fh)
                    if fh.tell() + math.prod(shape) * dtype.itemsize != info.file_size:
                        raise ValueError(f"{path}: {info.filename} holds {info.file_size} bytes, not {shape} {dtype}")
                shapes[info.filename.removesuffix(".npy")] = shape
            return shapes
    except (OSError, zipfile.BadZipFile, KeyError, EOFError) as err:
        raise ValueError(f"{path}: not a complete .npz ({err})") from err


#################################################################################
#                                  Shards                                       #
#################################################################################


@dataclass(frozen=True)
class ShardPlan:
    """`num` samples in shards of `shard_size` consecutive indices under `root`/shards."""

    root: Path
    num: int
    shard_size: int

    def __len__(self) -> int:
        return math.ceil(self.num / self.shard_size)

    def indices(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.num))

    def path(self, k: int) -> Path:
        return self.root / SHARDS / f"shard_{k:06d}.npz"

    def is_complete(self, k: int) -> bool:
        """Shard k exists with all its images and labels (a damaged file counts as missing)."""
        path = self.path(k)
        if not path.is_file():
            return False
        try:
            shapes = npz_shapes(path)
        except ValueError:
            return False
        n = len(self.indices(k))
        return shapes.get("arr_0", (None,))[0] == n and shapes.get("arr_1") == (n,)

    def missing(self) -> list[int]:
        return [k for k in range(len(self)) if not self.is_complete(k)]

    def remove_partial_files(self) -> None:
        """Temporary files of writers that were killed (never renamed into place): shards and PNGs."""
        for folder in (SHARDS, "images"):
            for tmp in (self.root / folder).glob(".*.partial"):
                tmp.unlink(missing_ok=True)

    def read(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self.path(k), allow_pickle=False) as data:
            return data["arr_0"], data["arr_1"]

    def read_all(self) -> Iterable[tuple[np.ndarray, np.ndarray]]:
        """Every shard in index order, one at a time."""
        return (self.read(k) for k in range(len(self)))


def save_pngs(directory: Path, images: np.ndarray, first_index: int, num: int) -> None:
    """uint8 NHWC images as DIR/NNNNNN.png numbered from `first_index` (zero-padded for `num` images).

    Each is written under a temporary name and renamed, so a PNG under its final name is whole; a failed write
    (a full disk) removes its temporary file and raises an OSError naming the PNG."""
    directory.mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(num - 1)))
    for i, image in enumerate(images, start=first_index):
        final = directory / f"{i:0{width}d}.png"
        tmp = temp_path(final)
        try:
            Image.fromarray(image).save(tmp, format="PNG")
            os.replace(tmp, final)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise OSError(err.errno, err.strerror or str(err), str(final)) from err
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
