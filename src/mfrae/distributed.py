"""Processes under torchrun: one `DistInfo` and the few collectives mfrae needs.

`init_distributed()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts a process group
when there is more than one process: nccl on GPU, gloo on CPU. With one process every helper below is the
identity, so single-process code never branches on it. Used by training, `mfrae stats` and `mfrae cache`.
"""

from __future__ import annotations

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


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_mean(value: Tensor, info: DistInfo) -> Tensor:
    """The mean of `value` over processes (a copy; `value` itself is left alone)."""
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value)
        value /= info.world_size
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
