"""The one training loop behind every stage (decoder, teacher, CMT, MFD, MFT).

The engine trains the `StageParts` it is given (the contract of `mfrae.train.parts`) and imports nothing
from the stage registry:

    for step in range(start, steps):
        lr <- schedule(step)
        for each of the `accum` micro-batches (DDP gradient sync on the last one only):
            x, y = prepare(next(data));  (objective(net, x, y, step, part).mean() / accum).backward()
        g = clip_grad_norm(params, grad_clip)             # pre-clip norm, checked for divergence
        optimizer.step();  ema <- decay ema + (1 - decay) params
        for each player (the decoder's discriminator): one turn on the last micro-batch
        log / checkpoint / sample grid at their intervals

Launch with `mfrae train ...` (one process) or `torchrun --nproc_per_node N -m mfrae train ...` (DDP: nccl on
GPU, gloo on CPU). Frozen models (encoder, teacher) live in the stage's objective / prepare function: they
are never in the optimizer and never wrapped by DDP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import logging
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from mfrae.checkpoint import load_model, load_state_dict_strict, save_model
from mfrae.data import make_loader
from mfrae.distributed import (BatchPart, DistInfo, all_max, all_mean, any_true, average_gradients, broadcast_module,
                               gather_objects, process_group)
from mfrae.errors import CheckpointError, ConfigError
from mfrae.images import make_grid, save_image_grid, to_uint8_nhwc
from mfrae.config import to_dict
from mfrae.train.config import LoopConfig, TrainConfig
from mfrae.train.optim import EMA, learning_rate, set_learning_rate
from mfrae.train.parts import Player, StageParts
from mfrae.train.runs import (STATE_FILE, RunDir, architecture_changes, command_line, config_changes,
                              format_changes, load_state)

log = logging.getLogger("mfrae")


class TrainingDiverged(RuntimeError):
    """The loss, the gradient or the weights became NaN / Inf, or the gradient norm exploded; every checkpoint
    written before passed the same checks and is kept."""


class TrainingStopped(Exception):
    """A SIGINT / SIGTERM stopped the run after step `step`, with every process agreeing on that step; the
    checkpoint of that step is `checkpoint`. Raised after the process group was torn down cleanly."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, info: DistInfo):
        super().__init__(f"stopped by signal {signum} after step {step}")
        self.signum, self.step, self.checkpoint, self.info = signum, step, checkpoint, info


# Devices on which the loss / gradient check runs after every step: on CPU it costs nothing, elsewhere it
# would wait for the device each step, so it runs only at the steps that sync anyway (see below).
EVERY_STEP_CHECK_DEVICES = frozenset({"cpu"})


def divergence_check_due(step: int, loop: LoopConfig, every_step: bool) -> bool:
    """Whether the loss and gradient of step `step` (counted from 1) are checked before its update.

    Always at the logged and checkpointed steps and at the last step: no checkpoint is written after an
    unchecked step, so a NaN at the end of a run never becomes the latest checkpoint.
    """
    return every_step or step % loop.log_every == 0 or step % loop.ckpt_every == 0 or step == loop.steps


def _max_abs(tensors: list[Tensor]) -> Tensor:
    """max |x| over all entries of `tensors`, NaN if any entry is NaN (max propagates it): one fused
    reduction per device and dtype, no copy of the weights. (`torch._foreach_norm` is the kernel behind
    `clip_grad_norm_`; its public wrapper `torch.nn.utils.get_total_norm` needs torch 2.6.)"""
    groups: dict[tuple, list[Tensor]] = defaultdict(list)
    for t in tensors:
        groups[(t.device, t.dtype)].append(t.detach())
    maxima = [torch.stack(torch._foreach_norm(group, math.inf)).amax().float() for group in groups.values()]
    return torch.stack([m.to(maxima[0].device) for m in maxima]).amax()


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


def train(
    cfg: TrainConfig,
    build: Callable[[DistInfo], StageParts],
    out: str | Path,
    resume: bool = False,
    command: list[str] | None = None,
    stop=None,
) -> Path | None:
    """Run (or continue) one stage into run directory `out`; returns the last checkpoint folder.

    `build(info)` makes the stage's parts for this process (`info`: device, rank, world size); it is called
    after the process group is up and the RNG is seeded, so everything it initialises at random is
    reproducible per run and rank. `stop`: a `mfrae.interrupts.StopSignals` (or anything with `signum`); once it
    is set on any process, every process finishes the same step, the checkpoint of that step is written and
    `TrainingStopped` is raised.
    """
    with process_group() as info:
        trainer = _Trainer(cfg, RunDir(out), info, build)
        last = trainer.fit(resume, command or command_line(), stop)
    if trainer.stopped_by:
        raise TrainingStopped(trainer.stopped_by, trainer.step, last, info)
    return last


#################################################################################
#                                  Loggers                                      #
#################################################################################


class RunLogger:
    """Where rank 0 sends what it logs besides metrics.jsonl: the scalars of each logged step and the preview
    grids (uint8 HWC). TensorBoard (`train.tensorboard`) and Weights & Biases (`train.wandb`) implement it."""

    def scalars(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def image(self, tag: str, grid, step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class TensorBoardLogger(RunLogger):
    """Event files in RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR`)."""

    def __init__(self, logdir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(logdir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def image(self, tag: str, grid, step: int) -> None:
        self.writer.add_image(tag, grid, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger(RunLogger):
    """A Weights & Biases run; its id is derived from the run directory, so `--resume` continues it."""

    def __init__(self, cfg: TrainConfig, root: Path):
        import wandb

        self.wandb = wandb
        options = cfg.train.wandb
        self.run = wandb.init(project=options.project, mode=options.mode, entity=options.entity,
                              name=options.name or root.name, tags=list(options.tags), config=to_dict(cfg),
                              id=wandb_run_id(root), resume="allow", dir=_wandb_dir(root))

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def image(self, tag: str, grid, step: int) -> None:
        self.run.log({tag: self.wandb.Image(grid)}, step=step)

    def close(self) -> None:
        self.run.finish()


def _wandb_dir(root: Path) -> str:
    """WANDB_DIR when set (W&B's own setting), else the run directory (its files then live with the run)."""
    return os.environ.get("WANDB_DIR") or str(root)


def wandb_run_id(root: Path) -> str:
    """A W&B run id fixed by the run directory's absolute path (the same on every --resume)."""
    return "mfrae-" + hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]


# Each logger: (config switch in words, module it imports, how to install it).
_LOGGER_IMPORTS = {"tensorboard": ("train.tensorboard", "tensorboard", "pip install tensorboard"),
                   "wandb": ("train.wandb", "wandb", "pip install 'mfrae[wandb]'")}


def requested_loggers(loop: LoopConfig) -> list[str]:
    return [name for name, on in (("tensorboard", loop.tensorboard), ("wandb", loop.wandb is not None)) if on]


def check_loggers(loop: LoopConfig) -> None:
    """Refuse, in one line at the start of a run, a configured logger whose package cannot be imported."""
    for name in requested_loggers(loop):
        key, module, install = _LOGGER_IMPORTS[name]
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ConfigError(f"{key} is on but `{module}` cannot be imported ({err}): {install}, or turn it "
                              f"off ({key}={'false' if name == 'tensorboard' else 'null'})") from None


def open_loggers(cfg: TrainConfig, root: Path) -> list[RunLogger]:
    """The loggers `cfg.train` asks for, started."""
    loggers: list[RunLogger] = []
    for name in requested_loggers(cfg.train):
        loggers.append(TensorBoardLogger(root / "tensorboard") if name == "tensorboard" else WandbLogger(cfg, root))
    return loggers


class _PlayerState:
    """A player with the optimizer the engine keeps for it."""

    def __init__(self, player: Player):
        self.player = player
        self.params = list(player.module.parameters())
        o = player.optim
        self.optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay)
        player.module.requires_grad_(False)  # trainable only during its own turn

    def state_dict(self) -> dict:
        module = {k: v.detach().clone() for k, v in self.player.module.state_dict().items()}
        return {"module": module, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict, source: str) -> None:
        load_state_dict_strict(self.player.module, state["module"], f"{source}['{self.player.name}']")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{source}['{self.player.name}']: optimizer does not match ({err})") from None

    def turn(self, net: nn.Module, x: Tensor, step: int, info: DistInfo) -> dict[str, Tensor | float]:
        """One update of the player on the batch x (see `mfrae.train.parts.Player`)."""
        p = self.player
        lr = p.optim.lr * (p.lr_factor(step) if p.lr_factor is not None else 1.0)
        set_learning_rate(self.optimizer, lr)
        p.module.requires_grad_(True)
        try:
            loss, stats = p.loss(net, x, step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(self.params, info)
            self.optimizer.step()
        finally:
            p.module.requires_grad_(False)
        logs = {f"{p.name}_loss": loss.detach(), **{f"{p.name}_{k}": v.detach() for k, v in stats.items()}}
        logs[f"{p.name}_lr"] = lr
        return logs


class _Trainer:
    def __init__(self, cfg: TrainConfig, run: RunDir, info: DistInfo, build: Callable[[DistInfo], StageParts]):
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
        self.parts = build(info)
        self.net = self.parts.net.to(info.device)
        self.ema = EMA(self.net)
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        cuda = info.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
            weight_decay=cfg.optim.weight_decay, fused=cuda or None,
        )
        self.players = [_PlayerState(p) for p in self.parts.players]
        model = torch.compile(self.net) if loop.compile else self.net
        if info.enabled:
            model = DistributedDataParallel(model, device_ids=[info.local_rank] if cuda else None, broadcast_buffers=False)
        self.model = model
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if cuda and loop.precision == "bf16" else contextlib.nullcontext()
        )
        self.step = 0
        self.loader = make_loader(
            self.parts.dataset, per_step, seed=loop.seed, rank=info.rank, world_size=info.world_size,
            num_workers=cfg.data.num_workers, pin_memory=cfg.data.pin_memory,
            prefetch_factor=cfg.data.prefetch_factor if cfg.data.num_workers > 0 else None,
        )
        self.loggers: list[RunLogger] = []
        self.check_every_step = info.device.type in EVERY_STEP_CHECK_DEVICES  # else: `divergence_check_due`
        self.last_good: Path | None = None  # the newest checkpoint (written or resumed) with checked weights
        self.last_good_step = 0
        self.stopped_by = 0  # the signal that stopped the run (agreed by every process); 0: not stopped

    @property
    def resolved_config(self) -> TrainConfig:
        """The config as run: the builder's resolved objective options in place of the configured ones."""
        if not self.parts.objective_config:
            return self.cfg
        return dataclasses.replace(self.cfg, objective=self.parts.objective_config)

    # -- checkpoints ------------------------------------------------------------------------------

    def _save(self) -> None:
        """Write the checkpoint of the current step, after checking that its weights are finite (all ranks)."""
        if self._weights_bad():
            self._diverged_weights()
        rngs = gather_objects(_rng_state(self.info), self.info)
        if self.info.is_main:
            state = {
                "step": self.step,
                "optimizer": self.optimizer.state_dict(),
                "rng": rngs,
                "loader": self.loader.state_dict(),
                "players": {p.player.name: p.state_dict() for p in self.players},
                "world_size": self.info.world_size,
            }
            self.last_good = self.run.save_checkpoint(
                self.step,
                {
                    "model.safetensors": lambda p: save_model(self.net, p),
                    "ema.safetensors": lambda p: save_model(self.ema.model, p),
                    STATE_FILE: lambda p: torch.save(state, p),
                },
                self.cfg.train.keep_last,
            )
        else:  # the same folder name on every rank (only rank 0 writes it), for the divergence message
            self.last_good = self.run.checkpoints / f"step_{self.step:08d}"
        self.last_good_step = self.step

    def _open_run(self, resume: bool, command: list[str]) -> None:
        """Claim the run directory (rank 0: lock, refusals), on --resume load and check the checkpoint, and
        only then write the run files: a refused or failed resume leaves config.yaml, run.json and
        metrics.jsonl as they were."""
        info = self.info
        if info.is_main:
            ckpt = self.run.claim(resume)
        else:
            ckpt = self.run.latest_checkpoint() if resume else None
        changed: dict[str, tuple] = {}
        if resume:
            if ckpt is None:  # rank 0 refused the same way
                raise ConfigError(f"--resume: {self.run.root} holds no complete checkpoint, nothing to resume")
            ckpt, changed = self._resume_newest_good()
            self.last_good, self.last_good_step = ckpt, self.step
        if info.is_main:
            self.run.start(self.resolved_config, command, resumed_at=self.step if resume else None, changed=changed)

    def _resume_newest_good(self) -> tuple[Path, dict[str, tuple]]:
        """Resume from the newest checkpoint that loads and holds finite weights, naming each newer one skipped
        and why; refuse in one line when none does. A changed network or process count is refused at once (an
        older checkpoint would not fix it). Every process reads the same files, so all pick the same one."""
        skipped: list[str] = []
        for ckpt in self.run.resume_candidates():
            try:
                changed = self._resume(ckpt)
            except (CheckpointError, FileNotFoundError) as err:
                reason = str(err).removeprefix(f"{ckpt}: ").removeprefix(f"{ckpt}/")
                skipped.append(f"{ckpt.name} ({reason})")
                continue
            if skipped and self.info.is_main:
                log.warning("--resume: skipped %s; resuming from %s", "; ".join(skipped), ckpt)
            return ckpt, changed
        raise CheckpointError(f"--resume: no checkpoint of {self.run.checkpoints} can be resumed from: "
                              f"{'; '.join(skipped)}; start a new run in another --out")

    def _resume(self, ckpt: Path) -> dict[str, tuple]:
        """Load checkpoint `ckpt` into the trainer; returns the config changes since the run's config.yaml.

        Refused before anything is loaded when the network's configuration changed (one line, old -> new);
        other changes (learning rate, batch, steps, ...) are allowed and reported."""
        saved = self.run.saved_config()
        changed = config_changes(saved, self.resolved_config) if saved is not None else {}
        network = architecture_changes(changed)
        if network:
            raise ConfigError(f"--resume: the network of {self.run.root} is not the configured one "
                              f"({format_changes(network)}); resume with the run's model settings or start a new --out")
        state = load_state(ckpt / STATE_FILE)
        if state["world_size"] != self.info.world_size:
            raise ConfigError(
                f"{ckpt}: saved with {state['world_size']} process(es), resumed with {self.info.world_size}; "
                "an exact resume needs the same number"
            )
        model_file = ckpt / "model.safetensors"
        model = load_model(model_file)
        # The files carry their network's config: a backstop for runs without (or with an edited) config.yaml.
        network = config_changes(model.config.to_dict(), self.net.config.to_dict())
        if network:
            raise ConfigError(f"--resume: {model_file} holds another network than the configured one "
                              f"({format_changes(network)}); resume with the run's model settings or start a new --out")
        load_state_dict_strict(self.net, model.state_dict(), str(model_file))
        ema_file = ckpt / "ema.safetensors"
        load_state_dict_strict(self.ema.model, load_model(ema_file).state_dict(), str(ema_file))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{ckpt / STATE_FILE}: optimizer does not match ({err})") from None
        self._load_players(state, ckpt / STATE_FILE)
        self.loader.load_state_dict(state["loader"])
        _set_rng_state(state["rng"][self.info.rank], self.info)
        self.step = int(state["step"])
        if self._weights_bad():  # written before mfrae checked weights: never train on from it
            raise CheckpointError(f"{ckpt}: holds NaN / Inf weights")
        if self.info.is_main:
            if changed:
                log.warning("resuming %s with changed settings (config.yaml is updated, run.json records them): %s",
                            self.run.root, format_changes(changed))
            log.info("resumed %s at step %d", ckpt, self.step)
        return changed

    def _load_players(self, state: dict, source: Path) -> None:
        saved = state.get("players", {})
        legacy = state.get("objective")  # mfrae 0.1: the decoder loss kept its discriminator in "objective"
        if not saved and legacy:
            saved = {"disc": {"module": legacy["discriminator"], "optimizer": legacy["disc_optimizer"]}}
        names = sorted(p.player.name for p in self.players)
        if sorted(saved) != names:
            raise CheckpointError(f"{source}: holds players {sorted(saved)}, this stage has {names}")
        for p in self.players:
            p.load_state_dict(saved[p.player.name], str(source))

    # -- logging and previews ---------------------------------------------------------------------

    def _open_loggers(self) -> None:
        """Start the configured loggers on rank 0 (their imports were checked before the run started)."""
        if self.info.is_main:
            self.loggers = open_loggers(self.cfg, self.run.root)

    def _preview(self) -> None:
        if self.parts.preview is None or not self.info.is_main:
            return
        # The same seeded generator every time: grids of one run are comparable across steps.
        images = self.parts.preview(self.ema.model, torch.Generator().manual_seed(1234), self.cfg.train.sample_count)
        if images is not None:
            save_image_grid(images, self.run.samples / f"step_{self.step:08d}.png")
            grid = make_grid(to_uint8_nhwc(images))
            for logger in self.loggers:
                logger.image(f"{self.cfg.stage}/samples", grid, self.step)

    # -- the loop ---------------------------------------------------------------------------------

    def fit(self, resume: bool, command: list[str], stop=None) -> Path | None:
        """Train from step 0, or on --resume from the run's latest checkpoint, to train.steps; returns the last
        checkpoint folder. Rank 0 holds the run directory's lock from the first check to the last write."""
        check_loggers(self.cfg.train)  # a logger that cannot be imported: refused before anything is written
        try:
            self._open_run(resume, command)
            return self._loop(stop)
        finally:
            self.run.unlock()

    def _loop(self, stop=None) -> Path | None:
        cfg, loop, info = self.cfg, self.cfg.train, self.info
        for p in self.players:  # every process starts from rank 0's player weights
            broadcast_module(p.player.module, info)
        self._open_loggers()
        progress = None
        if info.is_main:
            from tqdm.auto import tqdm

            progress = tqdm(total=loop.steps, initial=self.step, desc=cfg.stage, dynamic_ncols=True, leave=True)
        data = iter(self.loader)
        loss_sum = torch.zeros((), device=info.device)
        loss_count = 0
        grad_max = torch.zeros((), device=info.device)  # the largest pre-clip gradient norm of the log window
        extra_logs: dict[str, Tensor | float] = {}
        window_start, window_steps = time.perf_counter(), 0
        self.net.train()
        try:
            while self.step < loop.steps:
                step = self.step
                lr = learning_rate(cfg.optim, step, loop.steps)
                set_learning_rate(self.optimizer, lr)
                step_loss = torch.zeros((), device=info.device)
                for micro in range(self.accum):
                    x, y = self.parts.prepare(next(data), info.device)
                    sync = micro == self.accum - 1 or not info.enabled
                    with (contextlib.nullcontext() if sync else self.model.no_sync()), self.autocast:
                        part = BatchPart(info.rank * self.accum + micro, info.world_size * self.accum)
                        loss = self.parts.objective(self.model, x, y, step, part).float().mean() / self.accum
                    loss.backward()
                    step_loss += loss.detach()
                # Pre-clip global norm (clipping is off with grad_clip = 0: the norm is still measured).
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip or math.inf)
                grad_max = torch.maximum(grad_max, grad_norm.detach().float())
                # On CPU the check is free; on GPU it waits for the log / checkpoint steps and the last step.
                if divergence_check_due(step + 1, loop, self.check_every_step) and self._is_bad(step_loss, grad_norm):
                    self._diverged(step, step_loss, grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.ema.update(loop.ema_decay)
                for p in self.players:  # on the last micro-batch
                    if step >= p.player.start_step:
                        extra_logs.update(p.turn(self.net, x, step, info))
                self.step = step + 1
                loss_sum += step_loss
                loss_count += 1
                window_steps += 1

                if self.step % loop.log_every == 0 or self.step == loop.steps:
                    mean_loss = float(all_mean(loss_sum / loss_count, info))
                    gnorm = float(all_mean(grad_norm.detach().float(), info))
                    elapsed = time.perf_counter() - window_start
                    record = {
                        "step": self.step, "loss": mean_loss, "grad_norm": gnorm,
                        "grad_norm_max": float(all_max(grad_max, info)), "lr": lr,
                        "steps_per_sec": window_steps / elapsed if elapsed > 0 else 0.0,
                        "samples_per_sec": window_steps * loop.global_batch / elapsed if elapsed > 0 else 0.0,
                        "epoch": self.loader.epoch, **self._scalars(extra_logs),
                    }
                    if self.parts.evaluate is not None and (self.step % cfg.eval.every == 0 or self.step == loop.steps):
                        record.update(self.parts.evaluate(self.ema.model, self.step))
                    if self.parts.log_stats is not None:
                        record.update(self._scalars({k: all_mean(v.float(), info) for k, v in self.parts.log_stats().items()}))
                    bad_files = sum(len(b) for b in gather_objects(dict(self.loader.bad_files), info))
                    if bad_files:
                        record["bad_images"] = bad_files
                    if info.is_main:
                        self.run.log_metrics(record)
                        scalars = {f"{cfg.stage}/{k}": float(v) for k, v in record.items()
                                   if k != "step" and isinstance(v, (int, float))}
                        for logger in self.loggers:
                            logger.scalars(scalars, self.step)
                        progress.set_postfix(loss=f"{mean_loss:.4g}", gnorm=f"{gnorm:.3g}", lr=f"{lr:.2g}", refresh=False)
                    loss_sum.zero_()
                    loss_count, window_steps, window_start = 0, 0, time.perf_counter()
                    grad_max.zero_()
                if progress is not None:
                    progress.update(1)

                if self.step % loop.ckpt_every == 0 or self.step == loop.steps:
                    self._save()
                if (loop.sample_every and self.step % loop.sample_every == 0) or self.step == loop.steps:
                    self._preview()
                if stop is not None and self.step < loop.steps and self._stop_requested(stop):
                    if self.last_good_step != self.step or self.last_good is None:
                        self._save()
                    break
        finally:
            if progress is not None:
                progress.close()
            for logger in self.loggers:
                logger.close()
            self.loader.close()
        return self.last_good

    def _stop_requested(self, stop) -> bool:
        """Whether a signal asked any process to stop (every process gets the same answer after each step)."""
        signum = int(stop.signum or 0)
        if self.info.enabled:
            signum = int(all_max(torch.tensor(float(signum), device=self.info.device), self.info))
        self.stopped_by = signum
        return signum > 0

    @staticmethod
    def _scalars(values: dict[str, Tensor | float]) -> dict[str, float]:
        return {k: float(v) for k, v in values.items()}

    def _is_bad(self, loss: Tensor, grad_norm: Tensor) -> bool:
        """NaN / Inf loss or gradient, or a gradient norm above train.max_grad_norm, on any rank."""
        bad = ~torch.isfinite(loss) | ~torch.isfinite(grad_norm) | (grad_norm > self.cfg.train.max_grad_norm)
        return any_true(bad, self.info)

    def _weights_bad(self) -> bool:
        """NaN / Inf anywhere in the weights a checkpoint holds (network, EMA, players), on any rank."""
        modules = [self.net, self.ema.model, *(p.player.module for p in self.players)]
        return any_true(~torch.isfinite(_max_abs([t for m in modules for t in m.parameters()])), self.info)

    def _kept(self, step: int) -> str:
        """What the divergence at `step` (counted from 1) leaves to resume from, truthfully."""
        if self.last_good is None:
            return "no checkpoint was written yet"
        kept = f"the last checkpoint is {self.last_good} (step {self.last_good_step}; its weights were checked finite)"
        if step == self.last_good_step + 1:
            kept += "; the step right after it diverged, so resume it with other settings (e.g. a lower optim.lr)"
        return kept

    def _diverged(self, step: int, loss: Tensor, grad_norm: Tensor) -> None:
        where = (f"at step {step + 1}" if self.check_every_step else
                 f"by step {step + 1} (on {self.info.device.type} the check runs at log / checkpoint steps)")
        message = (
            f"training diverged {where}: loss {float(loss):.6g}, gradient norm {float(grad_norm):.6g} "
            f"(limit train.max_grad_norm={self.cfg.train.max_grad_norm:g}); stopped, {self._kept(step + 1)}"
        )
        if self.info.is_main:
            self.run.log_metrics({"step": step + 1, "diverged": True, "loss": float(loss), "grad_norm": float(grad_norm)})
        raise TrainingDiverged(message)

    def _diverged_weights(self) -> None:
        message = (f"training diverged at step {self.step}: its update left NaN / Inf weights (network, EMA or a "
                   f"player); stopped without writing its checkpoint, {self._kept(self.step)}")
        if self.info.is_main:
            self.run.log_metrics({"step": self.step, "diverged": True, "nonfinite_weights": True})
        raise TrainingDiverged(message)
