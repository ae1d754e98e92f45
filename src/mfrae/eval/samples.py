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

Float -> uint8 conversion (`to_uint8_nhwc`) follows the official sampling scripts: clamp to [0, 1], multiply
by 255 and *truncate* (`.to(torch.uint8)`), not round; reported FIDs were computed on images made this way.
"""

from __future__ import annotations

import os
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


def _load_npz(path: Path) -> ImageSet:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path} as .npz: {err}") from err
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a single .npy array, not an .npz with key 'arr_0'")
    with data:
        if "arr_0" not in data.files:
            raise ValueError(f"{path} has no key 'arr_0' (uint8 NHWC images); keys: {sorted(data.files)}")
        images = check_uint8_nhwc(data["arr_0"], f"{path} key 'arr_0'")
        label_key = next((key for key in LABEL_KEYS if key in data.files), None)
        labels = None
        if label_key is not None:
            labels = _check_labels(data[label_key], images.shape[0], f"{path} key '{label_key}'")
    return ImageSet(images=images, labels=labels, source=str(path))


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


def _load_dir(directory: Path) -> ImageSet:
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{directory} contains no {'/'.join(IMAGE_SUFFIXES)} images")
    arrays = []
    for file in files:
        try:
            with Image.open(file) as img:
                arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        except OSError as err:
            raise ValueError(f"cannot read image {file}: {err}") from err
        if arrays and arr.shape != arrays[0].shape:
            raise ValueError(f"image {file} has size {arr.shape[:2]}, but {files[0].name} has {arrays[0].shape[:2]}")
        arrays.append(arr)
    images = np.stack(arrays)
    return ImageSet(images=images, labels=_read_dir_labels(directory, len(files)), source=str(directory))


def load_images(path: str | os.PathLike[str]) -> ImageSet:
    """Images (uint8 [N, H, W, 3]) and optional labels from an ADM-style .npz or a folder of PNG/JPEG files."""
    src = Path(path)
    if src.is_dir():
        return _load_dir(src)
    if not src.is_file():
        raise FileNotFoundError(f"image set not found: {src}")
    return _load_npz(src)


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
