"""Resumable, rank-aware sampling and an endless batch loader whose position can be checkpointed.

Order. Epoch e of a run with seed s uses the permutation `numpy Generator(PCG64(SeedSequence([tag, s, e])))
.permutation(N)` of the N items (identity when shuffle=False). As in `torch.utils.data.DistributedSampler`,
the permutation is padded by repeating its head up to a multiple of world_size (or truncated when
drop_last=True) and rank r takes every world_size-th entry starting at r. So the order is a pure function of
(seed, epoch, rank, world_size), the ranks are disjoint up to the padding, and together they cover the data.

Position. The loader counts the samples this rank has *handed to the caller* in the current epoch (not what
workers have prefetched), so `state_dict()` taken after step k and restored into a fresh loader yields
exactly the batches k+1, k+2, ... of the uninterrupted run.

Randomness inside items. Batches carry (epoch, index) keys to the workers, and datasets derive their flip
coins from (seed, epoch, index) (see `mfrae.data.common`), so persistent workers need no epoch updates. The
DataLoader gets its own torch.Generator: by default it would draw worker base seeds from the global torch RNG
each epoch and so perturb the training's random stream.

Bad files. With workers, each worker has its own copy of the dataset and its own `bad_files`. The loader's
collate function therefore returns (batch, bad-file pairs) from the worker; the main process strips the pairs,
adds them to `loader.bad_files` (path -> reason, this rank only; all-gather across ranks to report a global
count) and logs each new path once as a warning on the "mfrae.data" logger.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from .common import DOMAIN_PERMUTATION, BadFiles, DataError, Item, KeyedDataset, seed_sequence

logger = logging.getLogger("mfrae.data")


def epoch_permutation(num_items: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of all items for (seed, epoch), int64."""
    rng = np.random.Generator(np.random.PCG64(seed_sequence(DOMAIN_PERMUTATION, seed, epoch)))
    return rng.permutation(num_items).astype(np.int64)


class ResumableSampler(Sampler[int]):
    """DistributedSampler-like sampler that can start mid-epoch.

    Args:
        data: the dataset (or its length).
        rank, world_size: this process's share; each rank gets `num_samples` indices per epoch.
        seed: permutation seed (the same on every rank).
        shuffle: permute each epoch; otherwise 0..N-1 in order.
        drop_last: drop the tail to make N divisible by world_size instead of padding with repeats.
        epoch, start: the epoch to produce and how many of this rank's samples to skip (already consumed).
    """

    def __init__(
        self,
        data: Sized | int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        epoch: int = 0,
        start: int = 0,
    ) -> None:
        num_items = data if isinstance(data, int) else len(data)
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if num_items < 1:
            raise DataError("cannot sample from an empty dataset")
        if drop_last and num_items < world_size:
            raise DataError(f"drop_last with {num_items} items leaves nothing for {world_size} ranks")
        self.num_items = num_items
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.drop_last = int(seed), shuffle, drop_last
        self.num_samples = num_items // world_size if drop_last else math.ceil(num_items / world_size)
        self.total_size = self.num_samples * world_size
        self.epoch = 0
        self.start = 0
        self.set_epoch(epoch)
        self.set_start(start)

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise DataError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def set_start(self, start: int) -> None:
        """Skip the first `start` of this rank's samples in the current epoch."""
        if not 0 <= start <= self.num_samples:
            raise DataError(f"start position {start} outside 0..{self.num_samples} (samples per rank per epoch)")
        self.start = int(start)

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """All of this rank's indices for `epoch` (default: the current one), padding included."""
        epoch = self.epoch if epoch is None else epoch
        order = epoch_permutation(self.num_items, self.seed, epoch) if self.shuffle else np.arange(self.num_items)
        if self.total_size > self.num_items:  # pad by cycling the head, as DistributedSampler does
            order = np.resize(order, self.total_size)
        return order[: self.total_size][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.start :].tolist())

    def __len__(self) -> int:
        return self.num_samples - self.start

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.start}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.set_epoch(state["epoch"])
        self.set_start(state["position"])


class _KeyedBatchSampler(Sampler[list[tuple[int, int]]]):
    """Groups the sampler's indices into batches of (epoch, index) keys, read at iteration time."""

    def __init__(self, sampler: ResumableSampler, batch_size: int, drop_last: bool) -> None:
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.sampler.epoch
        batch: list[tuple[int, int]] = []
        for index in self.sampler:
            batch.append((epoch, index))
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch and not self.drop_last:
            yield batch

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


class _KeyedView(Dataset):
    """Worker-side view: key (epoch, index) -> (item, bad files), through `load()` when the dataset has it."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed
        self.keyed = isinstance(dataset, KeyedDataset)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Item, BadFiles]:
        epoch, index = key
        if self.keyed:
            return self.dataset.load(index, epoch, self.seed)
        return self.dataset[index], ()


def collate_with_bad_files(samples: list[tuple[Any, BadFiles]]) -> tuple[Any, BadFiles]:
    """Collate the items with `default_collate` and concatenate their bad-file pairs."""
    batch = default_collate([item for item, _ in samples])
    bad = tuple(pair for _, pairs in samples for pair in pairs)
    return batch, bad


class InfiniteLoader:
    """Yields batches forever, epoch after epoch, and knows its (epoch, position) for checkpoints.

    Build it with `make_loader` (same arguments). Iterate with `for batch in loader` (or `next(iter(loader))`
    repeatedly in the same iterator); keep one live iterator at a time. `state_dict()` / `load_state_dict()`
    save and restore (epoch, position), where position counts this rank's samples already yielded in the
    epoch; load the state before iterating.

    `start` is a previous `loader.state_dict()` (or {"epoch": e, "position": p}). `pin_memory` is ignored
    without CUDA; workers are persistent when num_workers > 0.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = True,
        start: dict[str, int] | None = None,
        *,
        shuffle: bool = True,
        prefetch_factor: int | None = 2,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.drop_last = drop_last
        self.sampler = ResumableSampler(dataset, rank=rank, world_size=world_size, seed=seed, shuffle=shuffle)
        if drop_last and self.sampler.num_samples < batch_size:
            raise DataError(
                f"batch_size {batch_size} exceeds the {self.sampler.num_samples} samples per rank and epoch "
                f"({self.sampler.num_items} items over {world_size} rank(s)); with drop_last no batch would form"
            )
        self.epoch = 0
        self.position = 0
        self.bad_files: dict[str, str] = {}
        workers = max(0, int(num_workers))
        self._loader = DataLoader(
            _KeyedView(dataset, self.sampler.seed),
            batch_sampler=_KeyedBatchSampler(self.sampler, self.batch_size, drop_last),
            num_workers=workers,
            collate_fn=collate_with_bad_files,
            pin_memory=pin_memory and torch.cuda.is_available(),
            persistent_workers=workers > 0,
            prefetch_factor=prefetch_factor if workers > 0 else None,
            # A private generator: otherwise each epoch draws the workers' base seed from the global RNG.
            generator=torch.Generator().manual_seed(self.sampler.seed),
        )
        if start is not None:
            self.load_state_dict(start)

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank sees per epoch (padding included)."""
        return self.sampler.num_samples

    @property
    def steps_per_epoch(self) -> int:
        n = self.sampler.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _epoch_done(self, position: int) -> bool:
        left = self.sampler.num_samples - position
        return left < self.batch_size if self.drop_last else left <= 0

    def state_dict(self) -> dict[str, int]:
        """{"epoch", "position", "seed", "world_size", "num_items"}; a finished epoch reads as (epoch + 1, 0)."""
        epoch, position = self.epoch, self.position
        if self._epoch_done(position):
            epoch, position = epoch + 1, 0
        return {
            "epoch": epoch,
            "position": position,
            "seed": self.sampler.seed,
            "world_size": self.sampler.world_size,
            "num_items": self.sampler.num_items,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore (epoch, position); the seed, world size and dataset length must match the saved run."""
        for key in ("epoch", "position"):
            if key not in state:
                raise DataError(f"loader state lacks the key {key!r}")
        sampler = self.sampler
        current = {"seed": sampler.seed, "world_size": sampler.world_size, "num_items": sampler.num_items}
        for key, value in current.items():
            if key in state and int(state[key]) != value:
                raise DataError(
                    f"loader state has {key}={state[key]} but this loader has {key}={value}; "
                    "the data order would not continue the saved run"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.sampler.num_samples:
            raise DataError(f"loader state (epoch={epoch}, position={position}) is out of range")
        self.epoch, self.position = epoch, position

    def _record(self, bad: BadFiles) -> None:
        for path, reason in bad:
            if path not in self.bad_files:
                self.bad_files[path] = reason
                logger.warning(
                    "skipped unreadable image %s (%s); %d bad file(s) so far", path, reason, len(self.bad_files)
                )

    def __iter__(self) -> Iterator[Any]:
        while True:
            if self._epoch_done(self.position):
                self.epoch, self.position = self.epoch + 1, 0
            self.sampler.set_epoch(self.epoch)
            self.sampler.set_start(self.position)
            for batch, bad in self._loader:
                self._record(bad)
                # Count before yielding: a checkpoint taken while the caller holds this batch includes it.
                self.position = min(self.position + self.batch_size, self.sampler.num_samples)
                yield batch
            self.epoch, self.position = self.epoch + 1, 0

    def close(self) -> None:
        """Shut down persistent workers now instead of at garbage collection."""
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._loader._iterator = None


def make_loader(*args: Any, **kwargs: Any) -> InfiniteLoader:
    """An endless, resumable batch loader for this rank: `InfiniteLoader(*args, **kwargs)`.

    The arguments are InfiniteLoader's (see it and the module docstring):
    `make_loader(dataset, batch_size, seed=0, rank=0, world_size=1, num_workers=0, pin_memory=False,
    drop_last=True, start=None, *, shuffle=True, prefetch_factor=2)`.
    """
    return InfiniteLoader(*args, **kwargs)


# help() and inspect.signature() show InfiniteLoader's parameters rather than (*args, **kwargs).
make_loader.__signature__ = inspect.signature(InfiniteLoader).replace(  # type: ignore[attr-defined]
    return_annotation="InfiniteLoader"
)
