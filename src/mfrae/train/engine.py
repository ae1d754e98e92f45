"""The one training loop behind every stage (decoder, teacher, CMT, MFD, MFT).

A stage supplies a trainable network, an objective `loss = objective(net, x, y, step) -> per-sample losses`,
a dataset and a `prepare(batch) -> (x, y)` (e.g. images -> RAE latents); everything else is shared:

    for step in range(start, steps):
        lr <- schedule(step)
        for each of the `accum` micro-batches (DDP gradient sync on the last one only):
            x, y = prepare(next(data));  (objective(net, x, y, step).mean() / accum).backward()
        g = clip_grad_norm(params, grad_clip)             # pre-clip norm, checked for divergence
        optimizer.step();  ema <- decay ema + (1 - decay) params
        objective.discriminator_step(...)                 # stages with a second player (the decoder GAN)
        log / checkpoint / sample grid at their intervals

Launch with `mfrae train ...` (one process) or `torchrun --nproc_per_node N -m mfrae train ...` (DDP: nccl on
GPU, gloo on CPU). Frozen models (encoder, teacher) live in the stage's objective / prepare function: they
are never in the optimizer and never wrapped by DDP.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from mfrae.checkpoint import save_model
from mfrae.data import make_loader
from mfrae.errors import ConfigError
from mfrae.images import save_image_grid
from mfrae.train.config import OptimConfig, TrainConfig
from mfrae.train.runs import STATE_FILE, RunDir, command_line, load_state

log = logging.getLogger("mfrae")


class TrainingDiverged(RuntimeError):
    """The loss became NaN / Inf or the gradient norm exploded; the last good checkpoint is kept."""


#################################################################################
#                               Distributed                                     #
#################################################################################


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


def _all_mean(value: Tensor, info: DistInfo) -> Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value)
        value /= info.world_size
    return value


#################################################################################
#                          EMA and learning rate                                #
#################################################################################


class EMA:
    """Exponential moving average of a model's weights, initialised to the model: p_ema <- d p_ema + (1 - d) p."""

    def __init__(self, model: nn.Module):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        # Frozen tensors (pos-emb tables, Fourier frequencies, buffers) are equal in both copies already.
        self._pairs = [(e, p) for e, p in zip(self.model.parameters(), model.parameters()) if p.requires_grad]

    @torch.no_grad()
    def update(self, decay: float) -> None:
        ema, live = [e for e, _ in self._pairs], [p.detach() for _, p in self._pairs]
        torch._foreach_lerp_(ema, live, 1.0 - decay)


def learning_rate(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """Warm-up from 0, constant until `decay_start`, then linear / cosine to `final_lr` at `decay_end`."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant" or step < cfg.decay_start:
        return cfg.lr
    end = cfg.decay_end if cfg.decay_end is not None else total_steps
    frac = min(1.0, (step - cfg.decay_start) / max(1, end - cfg.decay_start))
    if cfg.schedule == "linear":
        return cfg.lr + (cfg.final_lr - cfg.lr) * frac
    return cfg.final_lr + 0.5 * (cfg.lr - cfg.final_lr) * (1 + math.cos(math.pi * frac))


#################################################################################
#                                 Training                                      #
#################################################################################


def _rng_state(info: DistInfo) -> dict:
    state = {"torch": torch.get_rng_state()}
    if info.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(info.device)
    return state


def _set_rng_state(state: dict, info: DistInfo) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and info.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], info.device)


def _gather(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, command: list[str] | None = None) -> Path:
    """Run (or continue) one stage into run directory `out`; returns the last checkpoint folder."""
    from mfrae.train.stages import build_stage  # stages import models / objectives; keep this module light

    info = init_distributed()
    try:
        return _Trainer(cfg, RunDir(out), info, build_stage).fit(resume, command or command_line())
    finally:
        shutdown_distributed()


class _Trainer:
    def __init__(self, cfg: TrainConfig, run: RunDir, info: DistInfo, build_stage):
        self.cfg, self.run, self.info = cfg, run, info
        loop = cfg.train
        per_step = loop.micro_batch or loop.global_batch // info.world_size
        accum, rest = divmod(loop.global_batch, per_step * info.world_size)
        if rest or accum < 1:
            raise ConfigError(
                f"train.global_batch={loop.global_batch} is not a multiple of micro_batch={per_step} x {info.world_size} process(es)"
            )
        self.micro_batch, self.accum = per_step, accum
        torch.manual_seed(loop.seed * 1000 + info.rank)  # distinct noise per rank, reproducible per run
        self.stage = build_stage(cfg, info.device)
        self.net = self.stage.net.to(info.device)
        if loop.grad_checkpointing and hasattr(self.net, "grad_checkpointing"):
            self.net.grad_checkpointing = True
        self.ema = EMA(self.net)
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        cuda = info.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
            weight_decay=cfg.optim.weight_decay, fused=cuda or None,
        )
        model = torch.compile(self.net) if loop.compile else self.net
        if info.enabled:
            model = DistributedDataParallel(model, device_ids=[info.local_rank] if cuda else None, broadcast_buffers=False)
            model.null_class = getattr(self.net, "null_class", None)
        self.model = model
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if cuda and loop.precision == "bf16" else contextlib.nullcontext()
        )
        self.step = 0
        self.loader = make_loader(
            self.stage.dataset, per_step, seed=loop.seed, rank=info.rank, world_size=info.world_size,
            num_workers=cfg.data.num_workers, pin_memory=cfg.data.pin_memory,
            prefetch_factor=cfg.data.prefetch_factor if cfg.data.num_workers > 0 else None,
        )
        self.writer = None

    # -- checkpoints ------------------------------------------------------------------------------

    def _save(self) -> Path | None:
        rngs = _gather(_rng_state(self.info), self.info)
        if not self.info.is_main:
            return None
        objective_state = self.stage.objective.state_dict() if hasattr(self.stage.objective, "state_dict") else None
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "rng": rngs,
            "loader": self.loader.state_dict(),
            "objective": objective_state,
            "world_size": self.info.world_size,
        }
        return self.run.save_checkpoint(
            self.step,
            {
                "model.safetensors": lambda p: save_model(self.net, p),
                "ema.safetensors": lambda p: save_model(self.ema.model, p),
                STATE_FILE: lambda p: torch.save(state, p),
            },
            self.cfg.train.keep_last,
        )

    def _resume(self) -> None:
        from mfrae.checkpoint import load_model

        ckpt = self.run.latest_checkpoint()
        if ckpt is None:
            if self.info.is_main:
                log.info("--resume: no checkpoint in %s yet, starting from step 0", self.run.root)
            return
        state = load_state(ckpt / STATE_FILE)
        if state["world_size"] != self.info.world_size:
            raise ConfigError(
                f"{ckpt}: saved with {state['world_size']} process(es), resumed with {self.info.world_size}; "
                "an exact resume needs the same number"
            )
        self.net.load_state_dict(load_model(ckpt / "model.safetensors").state_dict())
        self.ema.model.load_state_dict(load_model(ckpt / "ema.safetensors").state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("objective") is not None:
            self.stage.objective.load_state_dict(state["objective"])
        self.loader.load_state_dict(state["loader"])
        _set_rng_state(state["rng"][self.info.rank], self.info)
        self.step = int(state["step"])
        if self.info.is_main:
            self.run.truncate_metrics(self.step)
            log.info("resumed %s at step %d", ckpt, self.step)

    # -- logging and previews ---------------------------------------------------------------------

    def _open_tensorboard(self) -> None:
        if not (self.cfg.train.tensorboard and self.info.is_main):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        self.writer = SummaryWriter(str(self.run.root / "tensorboard"))

    def _preview(self) -> None:
        if self.stage.preview is None or not self.info.is_main:
            return
        # The same seeded generator every time: grids of one run are comparable across steps.
        images = self.stage.preview(self.ema.model, torch.Generator().manual_seed(1234), self.cfg.train.sample_count)
        if images is not None:
            save_image_grid(images, self.run.samples / f"step_{self.step:08d}.png")

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self, resume: bool, command: list[str]) -> Path:
        cfg, loop, info = self.cfg, self.cfg.train, self.info
        if info.is_main:
            self.run.start(cfg, command, resume)
        if resume:
            self._resume()
        self._open_tensorboard()
        last_ckpt = self.run.latest_checkpoint() if info.is_main else None
        on_cpu = info.device.type == "cpu"
        progress = None
        if info.is_main:
            from tqdm.auto import tqdm

            progress = tqdm(total=loop.steps, initial=self.step, desc=cfg.stage, dynamic_ncols=True, leave=True)
        data = iter(self.loader)
        loss_sum = torch.zeros((), device=info.device)
        loss_count = 0
        extra_logs: dict[str, float] = {}
        window_start, window_steps = time.perf_counter(), 0
        self.net.train()
        try:
            while self.step < loop.steps:
                step = self.step
                lr = learning_rate(cfg.optim, step, loop.steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                step_loss = torch.zeros((), device=info.device)
                for micro in range(self.accum):
                    x, y = self.stage.prepare(next(data), info.device)
                    sync = micro == self.accum - 1 or not info.enabled
                    with (contextlib.nullcontext() if sync else self.model.no_sync()), self.autocast:
                        loss = self.stage.objective(self.model, x, y, step).float().mean() / self.accum
                    loss.backward()
                    step_loss += loss.detach()
                # Pre-clip global norm (clipping is off with grad_clip = 0: the norm is still measured).
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip or math.inf)
                # On CPU the check is free; on GPU it waits for the log / checkpoint interval (no per-step sync).
                due = on_cpu or (step + 1) % loop.log_every == 0 or (step + 1) % loop.ckpt_every == 0
                if due and self._is_bad(step_loss, grad_norm):
                    self._diverged(step, step_loss, grad_norm, last_ckpt)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.ema.update(loop.ema_decay)
                if hasattr(self.stage.objective, "discriminator_step"):
                    x_disc = x  # the last micro-batch: images for the discriminator
                    extra_logs.update(self.stage.objective.discriminator_step(self.model, x_disc, step) or {})
                self.step = step + 1
                loss_sum += step_loss
                loss_count += 1
                window_steps += 1

                if self.step % loop.log_every == 0 or self.step == loop.steps:
                    mean_loss = float(_all_mean(loss_sum / loss_count, info))
                    gnorm = float(_all_mean(grad_norm.detach().float(), info))
                    elapsed = time.perf_counter() - window_start
                    record = {
                        "step": self.step, "loss": mean_loss, "grad_norm": gnorm, "lr": lr,
                        "steps_per_sec": window_steps / elapsed if elapsed > 0 else 0.0,
                        "samples_per_sec": window_steps * loop.global_batch / elapsed if elapsed > 0 else 0.0,
                        "epoch": self.loader.epoch, **extra_logs,
                    }
                    bad_files = sum(len(b) for b in _gather(dict(self.loader.bad_files), info))
                    if bad_files:
                        record["bad_images"] = bad_files
                    if info.is_main:
                        self.run.log_metrics(record)
                        if self.writer is not None:
                            for key, value in record.items():
                                if key != "step" and isinstance(value, (int, float)):
                                    self.writer.add_scalar(f"{cfg.stage}/{key}", value, self.step)
                        progress.set_postfix(loss=f"{mean_loss:.4g}", gnorm=f"{gnorm:.3g}", lr=f"{lr:.2g}", refresh=False)
                    loss_sum.zero_()
                    loss_count, window_steps, window_start = 0, 0, time.perf_counter()
                if progress is not None:
                    progress.update(1)

                if self.step % loop.ckpt_every == 0 or self.step == loop.steps:
                    last_ckpt = self._save() or last_ckpt
                if (loop.sample_every and self.step % loop.sample_every == 0) or self.step == loop.steps:
                    self._preview()
        finally:
            if progress is not None:
                progress.close()
            if self.writer is not None:
                self.writer.close()
            self.loader.close()
        return last_ckpt

    def _is_bad(self, loss: Tensor, grad_norm: Tensor) -> bool:
        """NaN / Inf loss or gradient, or a gradient norm above train.max_grad_norm, on any rank."""
        bad = (~torch.isfinite(loss) | ~torch.isfinite(grad_norm) | (grad_norm > self.cfg.train.max_grad_norm)).float()
        if self.info.enabled:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bool(bad)

    def _diverged(self, step: int, loss: Tensor, grad_norm: Tensor, last_ckpt: Path | None) -> None:
        kept = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
        message = (
            f"training diverged at step {step + 1}: loss {float(loss):.6g}, gradient norm {float(grad_norm):.6g} "
            f"(limit train.max_grad_norm={self.cfg.train.max_grad_norm:g}); stopped, {kept}"
        )
        if self.info.is_main:
            self.run.log_metrics({"step": step + 1, "diverged": True, "loss": float(loss), "grad_norm": float(grad_norm)})
        raise TrainingDiverged(message)
