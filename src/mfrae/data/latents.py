"""Latent cache: encode a dataset once with the frozen encoder, then train from the stored latents.

On-disk layout of a cache directory:

* `shard_00000.safetensors`, `shard_00001.safetensors`, ...: shard k holds items [k * shard_size,
  min((k + 1) * shard_size, count)) of the dataset, in order, as tensors `latents` [n, C, h, w] (the cache
  dtype), `labels` [n] int64 and, with `flip_both=True`, `latents_flipped` [n, C, h, w]. Its metadata names
  the shard, its first item and count, and the unreadable source files skipped while building it (JSON).
* `index.json`: {"format": "mfrae-latent-cache", "version", "complete", "count", "shard_size", "num_shards",
  "shards", "flip_both", "dtype", "latent_shape", "num_classes", "encoder": {"name", "fingerprint"},
  "dataset", "bad_files"}. It is written first with complete=false and rewritten with complete=true once every
  shard exists.

Flips (`flip_both`). The encoder is not equivariant to mirroring, so a flipped latent is not the mirrored
latent. With flip_both=True each image is encoded twice, as is and mirrored left-right in pixel space
(`latents_flipped[i] = encode_fn(hflip(image_i))`), and `LatentDataset(random_flip=True)` picks one of the two
per (seed, epoch, index) like the image datasets do. It doubles the build time and the disk size.

Interrupted builds. Every file is written to a temporary name, flushed to disk and renamed into place, so a
file that exists is complete. Running `build_latent_cache` again with the same arguments skips the shards
that exist (after checking their headers) and encodes only the missing ones; different arguments on an
existing directory raise instead of mixing two caches. With `rank`/`world_size`, rank r encodes the shards
k with k % world_size == r, and whichever rank finds every shard present writes the final index (call it
once more on one rank after a barrier to be sure).

Memory: one shard of latents is assembled in memory before it is written (shard_size x latent size, twice
with flip_both); e.g. 1024 DINOv2-B latents of 768 x 16 x 16 in float32 take 0.8 GB.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mfrae.fileio import atomic_write_text, commit, temp_path

from .common import BadFiles, DataError, EpochItems, Item, KeyedDataset, flip_coin, hflip
from .loader import collate_with_bad_files

CACHE_FORMAT = "mfrae-latent-cache"
CACHE_VERSION = 1
INDEX_NAME = "index.json"
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Keys of index.json that must agree between an unfinished cache and a build that resumes it.
_RESUME_KEYS = ("format", "version", "count", "shard_size", "flip_both", "dtype", "encoder")


def shard_name(k: int) -> str:
    return f"shard_{k:05d}.safetensors"


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise DataError(f"latent cache dtype {dtype} is not supported; use one of {', '.join(DTYPES)}")


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_index(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """Parse and check `cache_dir/index.json`; raise DataError naming the file and the key on problems."""
    path = Path(cache_dir) / INDEX_NAME
    if not path.is_file():
        raise DataError(f"latent cache index {path} not found; build the cache with build_latent_cache first")
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"latent cache index {path} cannot be parsed: {exc}") from exc
    if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT:
        raise DataError(f"{path} is not an mfrae latent cache index (format should be {CACHE_FORMAT!r})")
    if not isinstance(index.get("version"), int) or index["version"] > CACHE_VERSION:
        raise DataError(f"{path}: version {index.get('version')!r} is not readable by this mfrae (<= {CACHE_VERSION})")
    required = ("complete", "count", "shard_size", "num_shards", "shards", "flip_both", "dtype", "encoder")
    for key in required:
        if key not in index:
            raise DataError(f"latent cache index {path} lacks the key {key!r}")
    if index["dtype"] not in DTYPES:
        raise DataError(f"latent cache index {path}: dtype {index['dtype']!r} is not one of {', '.join(DTYPES)}")
    if not isinstance(index["shards"], list) or len(index["shards"]) != index["num_shards"]:
        raise DataError(f"latent cache index {path}: 'shards' must list num_shards={index['num_shards']!r} file names")
    for entry in index["shards"]:
        # Shards live in the cache directory itself: an index must not make mfrae read (or check) other files.
        name = Path(entry) if isinstance(entry, str) else None
        if name is None or name.is_absolute() or len(name.parts) != 1 or name.name in ("", ".", ".."):
            raise DataError(f"latent cache index {path}: shard entry {entry!r} is not a file name inside the cache")
    num_classes = index.get("num_classes")
    if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1):
        raise DataError(f"latent cache index {path}: num_classes must be a positive integer or null, got {num_classes!r}")
    return index


def _shard_rows(index: dict[str, Any], k: int) -> int:
    return min(index["shard_size"], index["count"] - k * index["shard_size"])


def _check_shard(path: Path, rows: int, flip_both: bool) -> tuple[list[int], dict[str, str]]:
    """Open a shard's header; return (latent shape per item, metadata) or raise DataError naming the file."""
    keys = ["latents", "labels"] + (["latents_flipped"] if flip_both else [])
    try:
        with safe_open(str(path), framework="pt") as f:
            present = set(f.keys())
            missing = [key for key in keys if key not in present]
            if missing:
                raise DataError(f"latent cache shard {path} lacks tensor(s) {', '.join(missing)}")
            shapes = {key: list(f.get_slice(key).get_shape()) for key in keys}
            metadata = dict(f.metadata() or {})
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"latent cache shard {path} cannot be read ({exc}); delete it to rebuild it") from exc
    for key, shape in shapes.items():
        if not shape or shape[0] != rows:
            raise DataError(f"latent cache shard {path}: {key} has shape {shape}, expected {rows} rows")
    if flip_both and shapes["latents_flipped"] != shapes["latents"]:
        raise DataError(f"latent cache shard {path}: latents_flipped shape differs from latents")
    return shapes["latents"][1:], metadata


class _ShardView(Dataset):
    """Items [start, stop) of a dataset, loaded unflipped (epoch 0, seed 0) with their bad-file reports."""

    def __init__(self, dataset: Dataset, start: int, stop: int) -> None:
        self.dataset, self.start, self.stop = dataset, start, stop
        self.keyed = isinstance(dataset, KeyedDataset)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> tuple[Item, BadFiles]:
        if self.keyed:
            return self.dataset.load(self.start + i, 0, 0)  # type: ignore[attr-defined]
        return self.dataset[self.start + i], ()


def _encode(encode_fn: Callable[[Tensor], Tensor], images: Tensor, dtype: torch.dtype) -> Tensor:
    with torch.no_grad():
        z = encode_fn(images)
    if not isinstance(z, Tensor) or z.ndim < 2 or z.shape[0] != images.shape[0]:
        shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise DataError(f"encode_fn returned {shape} for a batch of {images.shape[0]} images; expected [B, ...]")
    return z.detach().to("cpu", dtype)


def _encode_shard(
    dataset: Dataset,
    encode_fn: Callable[[Tensor], Tensor],
    start: int,
    stop: int,
    *,
    batch_size: int,
    flip_both: bool,
    dtype: torch.dtype,
    num_workers: int,
) -> tuple[dict[str, Tensor], list[tuple[str, str]]]:
    loader = DataLoader(
        _ShardView(dataset, start, stop),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_with_bad_files,
    )
    n = stop - start
    out: dict[str, Tensor] = {"labels": torch.empty(n, dtype=torch.int64)}
    bad: dict[str, str] = {}
    row = 0
    for (images, labels), pairs in loader:
        bad.update(pairs)
        b = images.shape[0]
        encoded = {"latents": _encode(encode_fn, images, dtype)}
        if flip_both:
            encoded["latents_flipped"] = _encode(encode_fn, hflip(images), dtype)
        for key, z in encoded.items():
            if key not in out:  # allocate once the latent shape is known: no concatenation copy at the end
                out[key] = torch.empty((n, *z.shape[1:]), dtype=dtype)
            elif out[key].shape[1:] != z.shape[1:]:
                raise DataError(
                    f"encode_fn returned latents of shape {tuple(z.shape[1:])}, earlier {tuple(out[key].shape[1:])}"
                )
            out[key][row : row + b] = z
        out["labels"][row : row + b] = torch.as_tensor(labels, dtype=torch.int64)
        row += b
    return out, sorted(bad.items())


def build_latent_cache(
    dataset: Dataset,
    encode_fn: Callable[[Tensor], Tensor],
    out_dir: str | os.PathLike,
    shard_size: int = 1024,
    batch_size: int = 64,
    flip_both: bool = False,
    *,
    encoder_name: str = "",
    encoder_fingerprint: str = "",
    dtype: torch.dtype = torch.float32,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> dict[str, Any]:
    """Encode every item of `dataset` once and store the latents in `out_dir`; return the index dict.

    Args:
        dataset: items (float image [3, H, W] in [0, 1], label); it must not flip randomly itself.
        encode_fn: float images [B, 3, H, W] in [0, 1] -> latents [B, ...]; called under torch.no_grad.
        out_dir: cache directory (created); an unfinished cache built with the same arguments is resumed.
        shard_size, batch_size: items per shard file and per encode_fn call.
        flip_both: also store the latents of the mirrored images (see the module docstring).
        encoder_name, encoder_fingerprint: identify the encoder; LatentDataset can insist on the fingerprint.
        dtype: storage dtype (float32, float16 or bfloat16).
        num_workers: DataLoader workers for decoding images.
        rank, world_size: split the shards between processes.
        progress: show a tqdm bar over this rank's shards.
    """
    if shard_size < 1 or batch_size < 1:
        raise DataError(f"shard_size and batch_size must be >= 1, got {shard_size} and {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if getattr(dataset, "random_flip", False):
        raise DataError(
            "build the latent cache from a dataset with random_flip=False (a cached random flip would be frozen "
            "forever); pass flip_both=True to store mirrored latents for flipping at train time"
        )
    count = len(dataset)  # type: ignore[arg-type]
    if count < 1:
        raise DataError("cannot build a latent cache from an empty dataset")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    num_shards = -(-count // shard_size)
    config: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "count": count,
        "shard_size": shard_size,
        "num_shards": num_shards,
        "shards": [shard_name(k) for k in range(num_shards)],
        "flip_both": bool(flip_both),
        "dtype": _dtype_name(dtype),
        "encoder": {"name": str(encoder_name), "fingerprint": str(encoder_fingerprint)},
        "num_classes": getattr(dataset, "num_classes", None),
        "dataset": repr(dataset),
    }

    index_path = out / INDEX_NAME
    if index_path.exists():
        index = read_index(out)
        for key in _RESUME_KEYS:
            if index.get(key) != config[key]:
                raise DataError(
                    f"{index_path}: the cache there was built with {key}={index.get(key)!r}, this build asks for "
                    f"{config[key]!r}; use another out_dir (or delete that cache) instead of mixing them"
                )
        if index["complete"]:
            return index
    else:
        index = {**config, "complete": False, "latent_shape": None, "bad_files": {}}
        _write_json_atomic(index_path, index)

    mine = [k for k in range(num_shards) if k % world_size == rank]
    if progress:
        from tqdm import tqdm

        mine = tqdm(mine, desc=f"latent cache {out}", unit="shard")
    for k in mine:
        final = out / shard_name(k)
        start, rows = k * shard_size, _shard_rows(index, k)
        if final.exists():
            _check_shard(final, rows, flip_both)  # finished earlier; raises if it is damaged
            continue
        for stale in out.glob(f".{final.name}.*.partial"):  # left by a killed build of this shard
            stale.unlink(missing_ok=True)
        tensors, bad = _encode_shard(
            dataset, encode_fn, start, start + rows,
            batch_size=batch_size, flip_both=flip_both, dtype=dtype, num_workers=num_workers,
        )
        metadata = {"shard": str(k), "start": str(start), "count": str(rows), "bad_files": json.dumps(bad)}
        tmp = temp_path(final)
        save_file(tensors, str(tmp), metadata=metadata)
        commit(tmp, final)

    if not all((out / shard_name(k)).exists() for k in range(num_shards)):
        return index  # other ranks are still encoding their shards
    return _finalize(out, index)


def _finalize(out: Path, index: dict[str, Any]) -> dict[str, Any]:
    """Check every shard, gather shapes and bad files, and mark the index complete."""
    latent_shape: list[int] | None = None
    bad: dict[str, str] = {}
    for k, name in enumerate(index["shards"]):
        shape, metadata = _check_shard(out / name, _shard_rows(index, k), index["flip_both"])
        if latent_shape is None:
            latent_shape = shape
        elif shape != latent_shape:
            raise DataError(f"latent cache shard {out / name}: latent shape {shape} differs from {latent_shape}")
        try:
            bad.update(dict(json.loads(metadata.get("bad_files", "[]"))))
        except (TypeError, ValueError) as exc:
            raise DataError(f"latent cache shard {out / name}: bad_files metadata is not valid JSON") from exc
    index = {**index, "complete": True, "latent_shape": latent_shape, "bad_files": bad}
    _write_json_atomic(out / INDEX_NAME, index)
    return index


class LatentDataset(EpochItems, Dataset):
    """Items (latent [C, h, w], int label) read from a finished latent cache, shard files memory-mapped.

    Args:
        cache_dir: directory written by `build_latent_cache`.
        random_flip: per (seed, epoch, index), return the latent of the mirrored image instead (needs a cache
            built with flip_both=True).
        seed: flip seed used by `__getitem__` (the loader passes its own seed to `load()`).
        dtype: dtype of the returned latents (None keeps the stored dtype).
        expected_fingerprint: if given, the cache's encoder fingerprint must equal it.

    Every shard's header is checked and the labels are read when the dataset is created; the latents are read
    per item through `safe_open`, with handles opened lazily in each worker process.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        random_flip: bool = False,
        seed: int = 0,
        dtype: torch.dtype | None = torch.float32,
        expected_fingerprint: str | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        index = read_index(self.cache_dir)
        index_path = self.cache_dir / INDEX_NAME
        if not index["complete"]:
            raise DataError(
                f"latent cache {index_path} is incomplete (an interrupted build?); run build_latent_cache again "
                "with the same arguments to finish it"
            )
        fingerprint = index["encoder"].get("fingerprint")
        if expected_fingerprint is not None and fingerprint != expected_fingerprint:
            raise DataError(
                f"latent cache {index_path} was encoded by fingerprint {fingerprint!r}, "
                f"expected {expected_fingerprint!r}"
            )
        if random_flip and not index["flip_both"]:
            raise DataError(f"random_flip needs a latent cache built with flip_both=True; {index_path} has none")
        self.index = index
        self.random_flip = bool(random_flip)
        self.seed = int(seed)
        self.epoch = 0
        self.dtype = dtype
        self.shard_size: int = index["shard_size"]
        self.latent_shape = tuple(index["latent_shape"] or ())
        self.num_classes: int | None = index.get("num_classes")
        self.bad_files: dict[str, str] = {}  # nothing is decoded here; the build's skips are in build_bad_files
        self.build_bad_files: dict[str, str] = dict(index.get("bad_files") or {})
        self._paths = [self.cache_dir / name for name in index["shards"]]
        labels = []
        for k, path in enumerate(self._paths):
            if not path.is_file():
                raise DataError(f"latent cache shard {path} is missing (listed in {index_path})")
            _check_shard(path, _shard_rows(index, k), index["flip_both"])
            with safe_open(str(path), framework="pt") as f:
                labels.append(f.get_tensor("labels"))
        self.labels = torch.cat(labels)
        self._check_labels(index_path)
        self._handles: dict[int, Any] = {}

    def _check_labels(self, index_path: Path) -> None:
        """Refuse a label outside [0, num_classes) now, naming the cache, instead of an indexing crash in training."""
        if not len(self.labels):
            return
        limit = self.num_classes
        bad = (self.labels < 0) | (self.labels >= limit) if limit is not None else self.labels < 0
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            k, row = divmod(i, self.shard_size)
            allowed = f"[0, {limit})" if limit is not None else ">= 0"
            raise DataError(
                f"latent cache {self.cache_dir}: item {i} ({self._paths[k].name}, row {row}) has label "
                f"{int(self.labels[i])}, outside {allowed} (num_classes in {index_path})"
            )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}  # file handles do not cross process boundaries; workers reopen lazily
        return state

    def __len__(self) -> int:
        return len(self.labels)

    def _handle(self, k: int) -> Any:
        handle = self._handles.get(k)
        if handle is None:
            try:
                handle = safe_open(str(self._paths[k]), framework="pt")
            except Exception as exc:
                raise DataError(f"latent cache shard {self._paths[k]} cannot be opened: {exc}") from exc
            self._handles[k] = handle
        return handle

    def _items_description(self) -> str:
        return f"latents in {self.cache_dir}"

    def load(self, index: int, epoch: int, seed: int) -> tuple[Item, BadFiles]:
        """Latent `index` (the mirrored-image latent when the flip coin says so) and its label."""
        k, row = divmod(index, self.shard_size)
        key = "latents_flipped" if self.random_flip and flip_coin(seed, epoch, index) else "latents"
        latent = self._handle(k).get_slice(key)[row : row + 1][0]
        if self.dtype is not None:
            latent = latent.to(self.dtype)
        return (latent, int(self.labels[index])), ()

    def __repr__(self) -> str:
        return f"LatentDataset({str(self.cache_dir)!r}, latents={len(self)}, shape={self.latent_shape})"
