"""Processes under torchrun: one `DistInfo` and the few collectives mfrae needs.

`init_distributed()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts a process group
when there is more than one process: nccl on GPU, gloo on CPU. With one process every helper below is the
identity, so single-process code never branches on it. Used by training, `mfrae stats` and `mfrae cache`.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class BatchPart:
    """Which share of an optimizer step's global batch one micro-batch is: part `index` of `count` equal parts,
    count = processes x accumulation steps, index = rank x accumulation steps + micro-batch. Objectives that
    must lay rows out over the whole step (the MeanFlow "prefix" row layout) read it; the others ignore it."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"BatchPart index must be in [0, {self.count}), got {self.index}")


WHOLE_BATCH = BatchPart()


def plain_module(net: nn.Module) -> nn.Module:
    """The network inside its DistributedDataParallel and torch.compile wrappers.

    For calls the wrappers must not see: forward-mode AD (torch.func.jvp does not go through DDP's forward,
    and DDP must only see the one autograd forward whose gradients it reduces).
    """
    while True:
        if isinstance(net, nn.parallel.DistributedDataParallel):
            net = net.module
        elif isinstance(net, torch._dynamo.eval_frame.OptimizedModule):
            net = net._orig_mod
        else:
            return net


def init_distributed(device: str | None = None) -> DistInfo:
    """Read torchrun's environment; start a process group when WORLD_SIZE > 1 (nccl on GPU, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world_size, local_rank, dev)


def shutdown_distributed(finished: bool = True) -> None:
    """Tear the process group down.

    After a clean finish (`finished`) every process first waits for the others: rank 0 still writes files
    when the others are done, and a process that destroys its group and exits while a peer still talks to
    it can abort in gloo's teardown. Objects that hold the group (DistributedDataParallel's reducer, often
    in reference cycles) are collected before it is destroyed, not during interpreter shutdown.
    """
    if not dist.is_initialized():
        return
    if finished:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()


class process_group:
    """`with process_group(device) as info:` - `init_distributed` on entry, `shutdown_distributed` on exit
    (with the final barrier only when the block finished without an exception: a failed process must not
    wait for peers that may never arrive)."""

    def __init__(self, device: str | None = None):
        self.device = device

    def __enter__(self) -> DistInfo:
        return init_distributed(self.device)

    def __exit__(self, exc_type, exc, tb) -> None:
        shutdown_distributed(finished=exc_type is None)


def all_mean(value: Tensor, info: DistInfo) -> Tensor:
    """The mean of `value` over processes (a copy; `value` itself is left alone)."""
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value)
        value /= info.world_size
    return value


def all_max(value: Tensor, info: DistInfo) -> Tensor:
    """The maximum of `value` over processes (a copy; `value` itself is left alone)."""
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def any_true(flag: Tensor, info: DistInfo) -> bool:
    """True when `flag` (a 0-d tensor, nonzero = true) is true on any process."""
    flag = flag.float()
    if info.enabled:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def gather_objects(obj, info: DistInfo) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process (picklable objects)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_module(module: nn.Module, info: DistInfo, src: int = 0) -> None:
    """Give every process rank `src`'s parameters and buffers of `module` (in place)."""
    if not info.enabled:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=src)


def average_gradients(params: list[nn.Parameter], info: DistInfo) -> None:
    """Replace each `.grad` by its mean over processes, with one collective for all of them."""
    grads = [p.grad for p in params if p.grad is not None]
    if not info.enabled or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
