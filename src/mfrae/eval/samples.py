"""Image sets for evaluation: read/write ADM-style .npz files and image folders; tensor <-> uint8 conversion.

Images are always handled as uint8 numpy arrays in NHWC layout with C = 3 (RGB), the layout of the ADM
evaluator (`arr_0` in an .npz; see docs/checkpoints.md, section 11). Labels are optional int64 arrays [N].

Sources accepted by `load_images`:
* an .npz with `arr_0` (uint8 [N, H, W, 3]; [N, H, W] or C = 1 grayscale is expanded to RGB) and optional
  labels under `arr_1` or `labels` (integers [N]);
* a directory of .png / .jpg / .jpeg files (case-insensitive suffix), read in sorted file-name order
  (zero-pad numbered names so that order is the intended one), all of the same size, converted to RGB.
  Labels come from `labels.npy` (integer array [N]) or `labels.txt` (one integer per line), in that same
  sorted order; having both is an error.

`open_images` gives the same sources as an `ImageStream` read batch by batch, so that 50,000 images never
need to be in memory at once: an .npz member cannot be memory-mapped (it sits inside a zip archive, possibly
compressed), so `arr_0` is read in pieces through `zipfile` after parsing its .npy header (format 1.0 / 2.0;
other header versions, Fortran order or object arrays fall back to loading the whole member); a folder is read
file by file.

Float -> uint8 conversion (`to_uint8_nhwc`) follows the official sampling scripts: clamp to [0, 1], multiply
by 255 and *truncate* (`.to(torch.uint8)`), not round; reported FIDs were computed on images made this way.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LABEL_KEYS = ("arr_1", "labels")


@dataclass(frozen=True)
class ImageSet:
    """uint8 images [N, H, W, 3], optional int64 labels [N], and where they came from."""

    images: np.ndarray
    labels: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return int(self.images.shape[0])


def check_uint8_nhwc(images: np.ndarray, where: str) -> np.ndarray:
    """Validate uint8 [N, H, W, 3] (expanding [N, H, W] / C = 1 grayscale to RGB); `where` names the source."""
    if not isinstance(images, np.ndarray):
        raise ValueError(f"{where}: images must be a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise ValueError(f"{where}: images must be uint8 (0..255), got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{where}: images must be NHWC with 1 or 3 channels, got shape {images.shape}")
    if images.shape[0] == 0:
        raise ValueError(f"{where}: no images")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images


def _check_labels(labels: np.ndarray, n: int, where: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{where}: labels must have shape ({n},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integers, got dtype {labels.dtype}")
    return labels.astype(np.int64)


def _read_dir_labels(directory: Path, n: int) -> np.ndarray | None:
    npy, txt = directory / "labels.npy", directory / "labels.txt"
    if npy.is_file() and txt.is_file():
        raise ValueError(f"{directory} has both labels.npy and labels.txt; keep one")
    if npy.is_file():
        try:
            raw = np.load(npy, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read labels {npy}: {err}") from err
        return _check_labels(raw, n, str(npy))
    if txt.is_file():
        lines = [line.strip() for line in txt.read_text().splitlines() if line.strip()]
        try:
            values = [int(line) for line in lines]
        except ValueError as err:
            raise ValueError(f"{txt}: every non-empty line must be one integer label ({err})") from err
        return _check_labels(np.array(values, dtype=np.int64), n, str(txt))
    return None


def _image_files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{directory} contains no {'/'.join(IMAGE_SUFFIXES)} images")
    return files


def _read_image_files(files: list[Path], first: Path) -> np.ndarray:
    """uint8 [len(files), H, W, 3]; every image must have the size of `first`'s (read once for the check)."""
    arrays = []
    expected: tuple[int, ...] | None = None
    for file in files:
        try:
            with Image.open(file) as img:
                arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        except OSError as err:
            raise ValueError(f"cannot read image {file}: {err}") from err
        if expected is None:
            with Image.open(first) as img:
                expected = (img.height, img.width, 3)
        if arr.shape != expected:
            raise ValueError(f"image {file} has size {arr.shape[:2]}, but {first.name} has {expected[:2]}")
        arrays.append(arr)
    return np.stack(arrays)


# -------------------------------------------------------------------------------- streaming image sets


@dataclass(frozen=True)
class ImageStream:
    """An image set read in batches: `count` images, optional int64 labels [count], and `batches(b)` yielding
    uint8 [<= b, H, W, 3] arrays in order (grayscale expanded to RGB)."""

    source: str
    count: int
    labels: np.ndarray | None
    read_batches: Callable[[int], Iterator[np.ndarray]]

    def __len__(self) -> int:
        return self.count

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for batch in self.read_batches(batch_size):
            yield check_uint8_nhwc(batch, self.source)

    @classmethod
    def from_images(cls, images: np.ndarray, labels: np.ndarray | None = None, source: str = "array") -> ImageStream:
        """An in-memory uint8 NHWC array as a stream."""
        images = check_uint8_nhwc(images, source)
        if labels is not None:
            labels = _check_labels(labels, images.shape[0], source)

        def read(batch_size: int) -> Iterator[np.ndarray]:
            for start in range(0, images.shape[0], batch_size):
                yield images[start:start + batch_size]

        return cls(source=source, count=int(images.shape[0]), labels=labels, read_batches=read)


def _npy_header(fh) -> tuple[tuple[int, ...], bool, np.dtype] | None:  # noqa: ANN001 (a zip member file)
    """(shape, fortran_order, dtype) of the .npy stream `fh` (positioned at its start), or None for a header
    version that numpy's public readers do not parse (then the caller loads the member whole)."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fh)
    return None


def _npz_member_batches(path: Path, key: str, batch_size: int) -> Iterator[np.ndarray]:
    """Rows of the .npz member `key`, `batch_size` at a time, read from the zip stream without loading it."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as fh:
        header = _npy_header(fh)
        if header is None or header[1] or header[2].hasobject:
            with np.load(path, allow_pickle=False) as data:
                whole = data[key]
            for start in range(0, whole.shape[0], batch_size):
                yield whole[start:start + batch_size]
            return
        shape, _, dtype = header
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            rows = min(batch_size, shape[0] - start)
            buffer = fh.read(rows * row_bytes)
            if len(buffer) != rows * row_bytes:
                raise ValueError(f"{path} key '{key}': file ends after {start} of {shape[0]} images")
            yield np.frombuffer(bytearray(buffer), dtype=dtype).reshape(rows, *shape[1:])  # writable for torch


def _npz_member_header(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as fh:
        header = _npy_header(fh)
    if header is None:
        with np.load(path, allow_pickle=False) as data:
            arr = data[key]
        return arr.shape, arr.dtype
    return header[0], header[2]


def _open_npz(path: Path) -> ImageStream:
    try:
        data = np.load(path, allow_pickle=False)  # an NpzFile reads the zip directory only
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path} as .npz: {err}") from err
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a single .npy array, not an .npz with key 'arr_0'")
    with data:
        keys = list(data.files)
        label_key = next((key for key in LABEL_KEYS if key in keys), None)
        raw_labels = data[label_key] if label_key is not None else None
    if "arr_0" not in keys:
        raise ValueError(f"{path} has no key 'arr_0' (uint8 NHWC images); keys: {sorted(keys)}")
    where = f"{path} key 'arr_0'"
    shape, dtype = _npz_member_header(path, "arr_0")
    if dtype != np.uint8:
        raise ValueError(f"{where}: images must be uint8 (0..255), got dtype {dtype}")
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[-1] not in (1, 3)):
        raise ValueError(f"{where}: images must be NHWC with 1 or 3 channels, got shape {tuple(shape)}")
    if shape[0] == 0:
        raise ValueError(f"{where}: no images")
    labels = None if raw_labels is None else _check_labels(raw_labels, shape[0], f"{path} key '{label_key}'")
    return ImageStream(source=str(path), count=int(shape[0]), labels=labels,
                       read_batches=lambda batch_size: _npz_member_batches(path, "arr_0", batch_size))


def _open_dir(directory: Path) -> ImageStream:
    files = _image_files(directory)

    def read(batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(files), batch_size):
            yield _read_image_files(files[start:start + batch_size], files[0])

    return ImageStream(source=str(directory), count=len(files), labels=_read_dir_labels(directory, len(files)),
                       read_batches=read)


def open_images(path: str | os.PathLike[str]) -> ImageStream:
    """The images of an ADM-style .npz or a PNG/JPEG folder (as `load_images` reads them), as a stream."""
    src = Path(path)
    if src.is_dir():
        return _open_dir(src)
    if not src.is_file():
        raise FileNotFoundError(f"image set not found: {src}")
    return _open_npz(src)


def load_images(path: str | os.PathLike[str]) -> ImageSet:
    """Images (uint8 [N, H, W, 3]) and optional labels from an ADM-style .npz or a folder of PNG/JPEG files,
    all in memory (`open_images` reads them batch by batch instead)."""
    stream = open_images(path)
    images = np.concatenate(list(stream.batches(stream.count)))
    return ImageSet(images=images, labels=stream.labels, source=stream.source)


def save_adm_npz(path: str | os.PathLike[str], images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Write images in the ADM evaluator's layout: `arr_0` uint8 [N, H, W, 3], and `arr_1` int64 labels [N].

    The file is written to exactly `path` (numpy would otherwise append ".npz" to other names)."""
    images = check_uint8_nhwc(images, "save_adm_npz")
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = _check_labels(labels, images.shape[0], "save_adm_npz")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as fh:
        np.savez(fh, **arrays)
    return out


def save_image_dir(directory: str | os.PathLike[str], images: np.ndarray, labels: np.ndarray | None = None) -> Path:
    """Write images as zero-padded PNGs (`000000.png`, ...) and, if given, `labels.txt` (one label per line)."""
    images = check_uint8_nhwc(images, "save_image_dir")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(images.shape[0] - 1)))
    for i, img in enumerate(images):
        Image.fromarray(img).save(out / f"{i:0{width}d}.png")
    if labels is not None:
        labels = _check_labels(labels, images.shape[0], "save_image_dir")
        (out / "labels.txt").write_text("".join(f"{int(v)}\n" for v in labels))
    return out


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """Float images [N, C, H, W] in [0, 1] -> uint8 numpy [N, H, W, C]: clamp, x * 255, truncate (no rounding).

    Truncation matches the official sampling scripts, so our samples are bit-identical to theirs."""
    if images.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"expected floating-point images in [0, 1], got dtype {images.dtype}")
    scaled = images.detach().float().clamp(0.0, 1.0) * 255.0
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8_nhwc(images: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 [N, H, W, C] -> float32 tensor [N, C, H, W] in [0, 1] (x / 255)."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 NHWC images, got {getattr(images, 'dtype', type(images))} "
                         f"with shape {getattr(images, 'shape', None)}")
    tensor = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return tensor.permute(0, 3, 1, 2).float().div_(255.0)
