"""Image sets for evaluation: read/write ADM-style .npz files and image folders.

Images are always handled as uint8 numpy arrays in NHWC layout with C = 3 (RGB), the layout of the ADM
evaluator (`arr_0` in an .npz; see docs/checkpoints.md, section 11). Labels are optional int64 arrays [N].

Sources accepted by `load_images`:
* an .npz with `arr_0` (uint8 [N, H, W, 3]; [N, H, W] or C = 1 grayscale is expanded to RGB) and optional
  labels under `arr_1` or `labels` (integers [N]);
* a directory of .png / .jpg / .jpeg files (case-insensitive suffix), read in sorted file-name order
  (zero-pad numbered names so that order is the intended one), all of the same size, converted to RGB
  (16-bit grey scaled to 8 bits, `mfrae.images.rgb8`).
  Labels come from `labels.npy` (integer array [N]) or `labels.txt` (one integer per line), in that same
  sorted order; having both is an error.

`open_images` gives the same sources as an `ImageStream` read batch by batch, so that 50,000 images never
need to be in memory at once: an .npz member cannot be memory-mapped (it sits inside a zip archive, possibly
compressed), so `arr_0` is read in pieces through `zipfile` after parsing its .npy header (format 1.0 / 2.0;
other header versions, Fortran order or object arrays fall back to loading the whole member); a folder is read
file by file.

Bad files: an empty, truncated or damaged .npz, another kind of file under an .npz name, or an .npz without
`arr_0` is refused with one line naming the file and what is wrong (`npz_keys`, `open_images`), never with
numpy's or zipfile's traceback.

The tensor <-> uint8 conversions `to_uint8_nhwc` (clamp, x 255, truncate: the official sampling scripts') and
`from_uint8_nhwc` live in `mfrae.images` and are re-exported here.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mfrae.fileio import commit, temp_path
from mfrae.images import from_uint8_nhwc, rgb8, to_uint8_nhwc

__all__ = ["IMAGE_SUFFIXES", "ImageSet", "ImageStream", "check_uint8_nhwc", "from_uint8_nhwc", "load_images",
           "npz_keys", "open_images", "save_adm_npz", "save_image_dir", "to_uint8_nhwc"]

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
                arr = rgb8(img, str(file))
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
    uint8 [<= b, H, W, 3] arrays in order (grayscale expanded to RGB); `size` is the images' (H, W)."""

    source: str
    count: int
    labels: np.ndarray | None
    read_batches: Callable[[int], Iterator[np.ndarray]]
    size: tuple[int, int] | None = None

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

        return cls(source=source, count=int(images.shape[0]), labels=labels, read_batches=read,
                   size=(int(images.shape[1]), int(images.shape[2])))


def _npy_header(fh) -> tuple[tuple[int, ...], bool, np.dtype] | None:  # noqa: ANN001 (a zip member file)
    """(shape, fortran_order, dtype) of the .npy stream `fh` (positioned at its start), or None for a header
    version that numpy's public readers do not parse (then the caller loads the member whole)."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fh)
    return None


# Failures of numpy / zipfile / zlib while reading an archive: a truncated or damaged file.
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)
# Files that are not zip archives, by their first bytes (to say what was given instead of an .npz).
_OTHER_FORMATS = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
                  (b"RIFF", "a RIFF (WebP / WAV) file"), (b"\x93NUMPY", "a single .npy array"))


@contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Turn a read failure of `what` in the .npz `path` into one ValueError naming both."""
    try:
        yield
    except _READ_ERRORS as err:
        raise ValueError(f"{path}: cannot read {what} ({type(err).__name__}: {err}); "
                         "is the file truncated or damaged?") from err


def npz_keys(path: str | os.PathLike[str]) -> list[str]:
    """The array names of the .npz `path`, from its zip directory; a ValueError naming the file when it is
    empty, another kind of file (an image renamed .npz, a single .npy) or a truncated / damaged archive."""
    path = Path(path)
    with _reading(path, "its first bytes"), open(path, "rb") as fh:
        magic = fh.read(8)
    if not magic:
        raise ValueError(f"{path}: empty file (0 bytes), not an .npz")
    if not magic.startswith(b"PK"):
        kind = next((name for prefix, name in _OTHER_FORMATS if magic.startswith(prefix)), None)
        raise ValueError(f"{path}: not an .npz (zip archive)" + (f"; the file is {kind}" if kind else ""))
    with _reading(path, "the zip directory"), zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return [name.removesuffix(".npy") for name in names]


def _npz_member_batches(path: Path, key: str, batch_size: int) -> Iterator[np.ndarray]:
    """Rows of the .npz member `key`, `batch_size` at a time, read from the zip stream without loading it."""
    what = f"key '{key}'"
    with _reading(path, what):
        archive = zipfile.ZipFile(path)
    with archive:
        with _reading(path, what):
            fh = archive.open(f"{key}.npy")
            header = _npy_header(fh)
        with fh:
            if header is None or header[1] or header[2].hasobject:
                with _reading(path, what), np.load(path, allow_pickle=False) as data:
                    whole = data[key]
                for start in range(0, whole.shape[0], batch_size):
                    yield whole[start:start + batch_size]
                return
            shape, _, dtype = header
            row_bytes = math.prod(shape[1:]) * dtype.itemsize
            for start in range(0, shape[0], batch_size):
                rows = min(batch_size, shape[0] - start)
                with _reading(path, what):
                    buffer = fh.read(rows * row_bytes)
                if len(buffer) != rows * row_bytes:
                    raise ValueError(f"{path} key '{key}': file ends after {start} of {shape[0]} images")
                yield np.frombuffer(bytearray(buffer), dtype=dtype).reshape(rows, *shape[1:])  # writable for torch


def _npz_member_header(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    with _reading(path, f"key '{key}'"):
        with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as fh:
            header = _npy_header(fh)
        if header is None:
            with np.load(path, allow_pickle=False) as data:
                arr = data[key]
            return arr.shape, arr.dtype
    return header[0], header[2]


def _open_npz(path: Path) -> ImageStream:
    keys = npz_keys(path)
    if "arr_0" not in keys:
        raise ValueError(f"{path} has no key 'arr_0' (uint8 NHWC images); keys: {sorted(keys)}")
    label_key = next((key for key in LABEL_KEYS if key in keys), None)
    raw_labels = None
    if label_key is not None:
        with _reading(path, f"key '{label_key}'"), np.load(path, allow_pickle=False) as data:
            raw_labels = data[label_key]
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
                       read_batches=lambda batch_size: _npz_member_batches(path, "arr_0", batch_size),
                       size=(int(shape[1]), int(shape[2])))


def _open_dir(directory: Path) -> ImageStream:
    files = _image_files(directory)
    try:
        with Image.open(files[0]) as first:  # the header only: every image must have this size
            size = (first.height, first.width)
    except OSError as err:
        raise ValueError(f"cannot read image {files[0]}: {err}") from err

    def read(batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(files), batch_size):
            yield _read_image_files(files[start:start + batch_size], files[0])

    return ImageStream(source=str(directory), count=len(files), labels=_read_dir_labels(directory, len(files)),
                       read_batches=read, size=size)


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

    The file is written to exactly `path` (numpy would otherwise append ".npz" to other names), atomically."""
    images = check_uint8_nhwc(images, "save_adm_npz")
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = _check_labels(labels, images.shape[0], "save_adm_npz")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        return commit(tmp, out)  # readers never see a half-written file
    finally:
        tmp.unlink(missing_ok=True)


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
