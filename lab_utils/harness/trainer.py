"""The model-agnostic training harness.

It knows devices, precision, gradient clipping, LR warm-up, EMA, checkpoints, resumption,
logging (``metrics.jsonl``; with ``trainer.tensorboard=true`` also TensorBoard's scalars, sample grids and
config), sample grids and the NaN guard. It knows nothing about GANs, VAEs or diffusion: a
family (a :class:`lab_utils.core.lab.Lab`) gives it named optimisers and a ``training_step`` that
calls ``ctx.optimize(name, loss)`` for each update and ``ctx.next_batch()`` for more data.

Resumption is exact on CPU: the checkpoint holds the step, the optimiser/LR/EMA states, the
position in the data order (epoch e visits a permutation seeded by ``seed + e``) and the
torch RNG state, so a killed-and-resumed run produces the same numbers as an uninterrupted one.

Several processes (``torchrun``, see :mod:`lab_utils.harness.distributed`): the lab is wrapped in
``DistributedDataParallel`` and every loss is computed inside DDP's forward (``ctx.optimize``
takes a function for that), so each backward averages the gradients over the processes. Each
process reads its own shard of every global batch (``DistributedSampler``: the union of the
shards is exactly the single-process batch), and rank 0 alone keeps the EMA, writes logs,
grids and checkpoints. DDP looks for unused parameters unless the lab says every update uses
all of them (``Lab.ddp_find_unused_parameters``): a GAN's critic update does not touch the
generator and its generator update does not train the text encoder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from lab_utils.core.config import TrainerConfig
from lab_utils.core.lab import DataInfo, Lab
from lab_utils.core.plotting import save_grid, tiles
from lab_utils.core.schema import to_container
from lab_utils.harness import distributed
from lab_utils.harness.checkpoint import CheckpointError, checkpoint_dir, load_state_into, save_checkpoint
from lab_utils.harness.data_stream import DataStream
from lab_utils.harness.devices import autocast_for, effective_precision, sampling_precision
from lab_utils.harness.ema import EMA
from lab_utils.harness.progress import TrainingProgress
from lab_utils.harness.step_context import LossFunction, TrainingStepContext

log = logging.getLogger("genlab.train")


@dataclass
class Callback:
    """``fn(trainer) -> {name: value}`` run every ``every`` steps, or each time the training time
    passes another ``every_seconds`` (evenly spaced points on a wall-clock axis), and at the end.
    The values go into ``metrics.jsonl`` as ``{"step", "train_seconds", **values}``. It runs under a
    forked RNG, so whatever randomness it uses (sampling, metric subsets) never changes the training.
    """

    fn: Callable[["Trainer"], dict[str, float] | None]
    every: int | None = None
    every_seconds: float | None = None

    def __post_init__(self) -> None:
        if (self.every is None) == (self.every_seconds is None):
            raise ValueError("a Callback needs exactly one of every (steps) and every_seconds")

    def due(self, step: int, seconds_before: float, seconds_now: float) -> bool:
        if self.every is not None:
            return step % self.every == 0
        return seconds_now // self.every_seconds > seconds_before // self.every_seconds


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; training stopped and the last good checkpoint was kept."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, read-only folder); the previous one is intact."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path | None
    images_seen: int
    train_seconds: float  # time spent in training steps (no sampling, no checkpointing)
    losses: dict[str, float] = field(default_factory=dict)  # the last logged averages

    @property
    def images_per_second(self) -> float:
        return self.images_seen / self.train_seconds if self.train_seconds > 0 else float("nan")


def lr_factor(k: int, warmup_steps: int, decay_steps: int | None = None) -> float:
    r"""The learning rate of update k (0-based) as a fraction of the optimiser's: a linear warm-up,
    $\min(1, (k + 1) / W)$, times a cosine decay to 0 over $T$ updates (Loshchilov & Hutter 2017),
    $\tfrac12 (1 + \cos(\pi \min(k / T, 1)))$; each is 1 when switched off (W = 0, T = None)."""
    warm = min(1.0, (k + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if decay_steps is None:
        return warm
    return warm * 0.5 * (1.0 + math.cos(math.pi * min(k / decay_steps, 1.0)))


def lr_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int,
                decay_steps: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """The harness's schedule for every optimiser (``trainer.warmup_steps``, ``trainer.lr_decay_steps``): the
    labs set a base rate per parameter group and never touch it; its state is checkpointed with the run."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_factor(k, warmup_steps, decay_steps))


@dataclass
class LogWindow:
    """What the steps since the last log row add up to: the named values (summed on the device, no host sync
    until the row is written) and how many steps gave each (a lab in stages, such as the latent DDPM, names
    other values in each stage), the step count, training seconds and images."""

    start_step: int  # the step the window began after
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    count: int = 0
    seconds: float = 0.0
    images: int = 0

    def add(self, named: dict[str, torch.Tensor], seconds: float, images: int) -> None:
        for key, value in named.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.counts[key] = self.counts.get(key, 0) + 1
        self.count, self.seconds, self.images = self.count + 1, self.seconds + seconds, self.images + images


class Trainer:
    """Trains ``lab`` as ``settings`` (the run's ``trainer`` section, typed) say; ``cfg`` is the run's whole config,
    saved with every checkpoint (its ``seed`` orders the data)."""

    def __init__(self, cfg: DictConfig, settings: TrainerConfig, run_dir: Path, lab: Lab, train_set: Dataset,
                 data_info: DataInfo, device: torch.device, callbacks: tuple[Callback, ...] = (),
                 dist_info: distributed.DistInfo = distributed.DistInfo()):
        self.cfg, self.settings, self.run_dir, self.lab, self.data_info = cfg, settings, run_dir, lab, data_info
        self.device, self.dist = device, dist_info
        self.callbacks = tuple(callbacks) if dist_info.is_main else ()
        self.optimizers = lab.configure_optimizers()
        if not self.optimizers:
            raise ValueError(f"{type(lab).__name__}.configure_optimizers() returned no optimiser")
        self.schedulers = {name: lr_schedule(opt, settings.warmup_steps, settings.lr_decay_steps)
                           for name, opt in self.optimizers.items()}
        self.precision = effective_precision(settings.precision, device)  # resolved once, not on every step
        self.sampling_precision = sampling_precision(settings.precision, device)  # grids and callbacks' samples
        fp16 = self.precision == "fp16"
        self.scalers = {name: torch.amp.GradScaler("cuda") for name in self.optimizers} if fp16 else {}
        # The EMA, logs, grids and checkpoints live on rank 0 only.
        use_ema = settings.ema_decay > 0 and dist_info.is_main
        self.ema = (EMA(lab, lab.ema_modules(), settings.ema_decay, settings.ema_start, settings.ema_warmup)
                    if use_ema else None)
        world = dist_info.world_size
        if settings.batch_scope == "global" and settings.batch_size % world:
            raise ValueError(f"trainer.batch_size={settings.batch_size} (the global batch) does not split over {world} "
                             "processes; choose a multiple of the number of processes or trainer.batch_scope=per_process")
        per_process = settings.batch_size // world if settings.batch_scope == "global" else settings.batch_size
        self.stream = DataStream(train_set, per_process, cfg.seed, device, settings.num_workers, dist_info.rank, world,
                                 channels_last=settings.channels_last, on_device=settings.data_on_device)
        self.loss_module: nn.Module = LossFunction(lab)
        self.ddp: DistributedDataParallel | None = None
        if dist_info.enabled:
            if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in lab.modules()):
                if device.type == "cuda":  # no lab here has BatchNorm; a user's lab gets synchronised statistics
                    nn.SyncBatchNorm.convert_sync_batchnorm(lab)
                else:
                    log.warning("BatchNorm statistics are per process on %s (SyncBatchNorm needs CUDA)", device.type)
            self.ddp = DistributedDataParallel(self.loss_module, device_ids=[device.index] if device.type == "cuda"
                                               else None,
                                               find_unused_parameters=type(lab).ddp_find_unused_parameters)
            self.loss_module = self.ddp
        self.step, self.images_seen, self.train_seconds = 0, 0, 0.0
        self.last_checkpoint: Path | None = None
        # TensorBoard (rank 0): the class now, so a missing package is refused before training; the writer in fit(),
        # once a resumed run's step is known (its purge_step drops what a killed run logged after its checkpoint)
        self.writer_class = self._tensorboard() if settings.tensorboard and dist_info.is_main else None
        self.writer = None
        if self.precision != settings.precision:
            where = device.type
            if device.type == "cpu" and settings.precision == "bf16":
                where = "a CPU without AMX or AVX-512 BF16"
            log.warning("trainer.precision=%s is not used on %s; training in fp32", settings.precision, where)

    def release(self) -> None:
        """Drop the DDP wrapper (before the process group is destroyed: see ``lab_utils.harness.distributed``)."""
        self.loss_module = LossFunction(self.lab)
        self.ddp = None

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The checkpoint (on every process: it gathers each process's RNG state; rank 0 writes it)."""
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        per_rank = distributed.gather_objects(rng)
        return {
            "config": to_container(self.cfg),
            "data_info": self.data_info.to_dict(),
            "model": self.lab.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "schedulers": {name: sched.state_dict() for name, sched in self.schedulers.items()},
            "scalers": {name: scaler.state_dict() for name, scaler in self.scalers.items()},
            "trainer": {"step": self.step, "images_seen": self.images_seen, "train_seconds": self.train_seconds,
                        "data": self.stream.state_dict(), "world_size": self.dist.world_size},
            "rng": per_rank[0],
            "rng_per_rank": per_rank,
        }

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        load_state_into(self.lab, state["model"], path, self.cfg.model.name)
        if set(state["optimizers"]) != set(self.optimizers):
            raise CheckpointError(f"{path} has optimisers {sorted(state['optimizers'])}, the model {sorted(self.optimizers)}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
            self.schedulers[name].load_state_dict(state["schedulers"][name])
        for name, scaler in self.scalers.items():
            if name in state.get("scalers", {}):
                scaler.load_state_dict(state["scalers"][name])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        counters = state["trainer"]
        self.step, self.images_seen = int(counters["step"]), int(counters["images_seen"])
        self.train_seconds = float(counters["train_seconds"])
        self.stream.load_state_dict(counters["data"])
        per_rank = state.get("rng_per_rank") or [state["rng"]]
        if len(per_rank) == self.dist.world_size:  # the same processes as before: exact resumption
            rng = per_rank[self.dist.rank]
        elif self.dist.is_main:
            rng = state["rng"]
        else:  # more processes than before: a fresh stream per extra process
            torch.manual_seed(self.cfg.seed + 1000 * self.step + self.dist.rank)
            return
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and "cuda" in rng:
            cuda_state = rng["cuda"]
            torch.cuda.set_rng_state(cuda_state[0] if isinstance(cuda_state, list) else cuda_state, self.device)

    def save(self) -> Path | None:
        tcfg = self.settings
        state = self.state_dict()  # collective: every process takes part
        if self.dist.is_main:
            try:
                self.last_checkpoint = save_checkpoint(state, self.run_dir, self.step, tcfg.keep_checkpoints)
            except OSError as err:  # disk full, read-only folder, ...: the write was atomic, nothing is lost
                kept = (f"the last good checkpoint {self.last_checkpoint} is intact" if self.last_checkpoint
                        else "no checkpoint was written yet")
                raise CheckpointWriteError(
                    f"could not write the checkpoint of step {self.step} into {checkpoint_dir(self.run_dir)} "
                    f"({err.strerror or err}); training stopped and {kept}. Free some space or make the folder "
                    f"writable, then continue with: genlab train resume={self.run_dir}"
                ) from None
        return self.last_checkpoint

    # ---------------------------------------------------------------- helpers
    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast_for(self.precision, self.device)

    def diverged_message(self, what: str, value: torch.Tensor) -> str:
        kept = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written yet"
        return (f"{what} became {value.float().flatten()[0].item()} at step {self.step + 1}; training stopped and "
                f"{kept}. Try a lower learning rate, trainer.grad_clip=1.0, a longer trainer.warmup_steps, "
                "or trainer.precision=fp32.")

    def _tensorboard(self) -> type:
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional: the tensorboard extra
        except ImportError:
            raise ValueError("trainer.tensorboard=true needs the tensorboard package: pip install 'genlab[tensorboard]'") from None
        return SummaryWriter

    def open_tensorboard(self) -> None:
        """The TensorBoard writer of ``<run>/tensorboard`` (rank 0, ``trainer.tensorboard=true``), with the run's
        config as text at the current step. A resumed run purges the events logged after its checkpoint's step (a
        killed run logs past its last checkpoint; those steps are trained again), as ``metrics.jsonl`` drops them."""
        if self.writer_class is None or self.writer is not None:
            return
        purge_step = self.step + 1 if self.step > 0 else None  # the checkpoint's own step was logged before it
        self.writer = self.writer_class(str(self.run_dir / "tensorboard"), purge_step=purge_step)
        config = OmegaConf.to_yaml(self.cfg, resolve=True)
        self.writer.add_text("config", "    " + config.replace("\n", "\n    "), self.step)  # indented: verbatim

    def close_tensorboard(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    @contextlib.contextmanager
    def sampling_weights(self) -> Iterator[Lab]:
        """The lab in eval mode with its EMA weights swapped in (restored afterwards)."""
        was_training = self.lab.training
        self.lab.eval()
        try:
            with self.ema.applied(self.lab) if self.ema else contextlib.nullcontext():
                yield self.lab
        finally:
            self.lab.train(was_training)

    def run_callbacks(self, seconds_before: float = 0.0, final: bool = False) -> None:
        for callback in self.callbacks:
            if not (final or callback.due(self.step, seconds_before, self.train_seconds)):
                continue
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                values = callback.fn(self)
            if values:
                self.log_row({"step": self.step, "train_seconds": round(self.train_seconds, 3), **values})

    @torch.no_grad()
    def write_samples(self) -> Path:
        """A grid with the dataset's fixed prompts (rows) and fixed seeds (columns)."""
        tcfg = self.settings
        prompts = list(self.data_info.prompts[: tcfg.num_sample_prompts]) or [""]
        prompts = [p for p in prompts for _ in range(tcfg.samples_per_prompt)]
        generator = torch.Generator(device=self.device).manual_seed(tcfg.sample_seed)
        with self.sampling_weights(), autocast_for(self.sampling_precision, self.device):
            images = self.lab.sample(prompts, generator=generator, options=self.lab.sample_options(tcfg.sample_options))
        images = images.float()  # (N, C, H, W): bf16 under autocast
        if self.writer is not None:  # a row per prompt, a column per seed, pixel for pixel
            self.writer.add_image("samples", tiles(images, ncols=tcfg.samples_per_prompt), self.step, dataformats="HWC")
        return save_grid(images, self.run_dir / "samples" / f"step_{self.step:06d}.png", captions=prompts,
                         ncols=tcfg.samples_per_prompt, title=f"{self.cfg.model.name} step {self.step}")

    def log_row(self, row: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(key, value, row["step"])

    # ---------------------------------------------------------------- the loop
    def budget_used(self, clock: bool = True) -> float:
        """The fraction of the budget spent: the largest of steps, images and (with ``clock``) seconds (1.0 = done)."""
        tcfg = self.settings
        fractions = [self.step / tcfg.steps]
        if tcfg.max_images is not None:
            fractions.append(self.images_seen / tcfg.max_images)
        if clock and tcfg.max_seconds is not None:
            fractions.append(self.train_seconds / tcfg.max_seconds)
        return max(fractions)

    def run_step(self) -> tuple[dict[str, torch.Tensor], int]:
        """One training step of the lab: its named values (losses, statistics, gradient norms; tensors
        still on the device) and the number of images all processes drew. No host-device sync unless
        ``trainer.nan_check=step``."""
        ctx = TrainingStepContext(self)
        losses = self.lab.training_step(ctx.next_batch(), ctx)
        named = {**{f"loss/{k}" if "/" not in k else k: torch.as_tensor(v, device=self.device).detach().float()
                    for k, v in losses.items()},
                 **{f"grad_norm/{k}": v for k, v in ctx.grad_norms.items()}}
        if self.settings.nan_check == "step":
            self.check_finite(named)
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.lab, self.step)
        return named, ctx.images * self.dist.world_size

    def check_finite(self, named: dict[str, torch.Tensor], at: str = "", same_everywhere: bool = False) -> None:
        """Stop with :class:`TrainingDiverged` if a value is NaN/inf on any process: all processes stop together
        (one all-reduce of a flag unless ``same_everywhere``, i.e. the values are already averaged over them)."""
        checked = {key: value for key, value in named.items()
                   # fp16: an overflowing step is expected now and then (the scaler skips it)
                   if not (key.startswith("grad_norm/") and self.scalers)}
        if not checked:
            return
        values = torch.cat([value.detach().float().reshape(-1) for value in checked.values()])
        if torch.isfinite(values).all() if same_everywhere else distributed.all_finite(values):
            return
        for key, value in checked.items():
            if not torch.isfinite(value).all():
                raise TrainingDiverged(self.diverged_message(key + at, value))
        raise TrainingDiverged(self.diverged_message("a loss on another process" + at, torch.tensor(float("nan"))))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def fit(self) -> TrainResult:
        tcfg = self.settings
        self.lab.train()
        main = self.dist.is_main
        progress = TrainingProgress(enabled=tcfg.progress and main, start=self.budget_used(),
                                    desc=f"train {self.cfg.model.name}")
        window, last_row, last_grid_step = LogWindow(self.step), {}, -1
        draws = getattr(self.lab, "generative", True)  # a lab that is not generative (CLIP, the evaluator) has no grids to draw
        # With several processes every one must stop at the same step: the step and image budgets
        # agree by construction, a time budget is decided by rank 0 and broadcast. Reading the broadcast
        # flag on the host is a host-device sync, so rank 0's clock is consulted only every log_every steps,
        # where the log row syncs anyway (a run may pass max_seconds by up to log_every - 1 steps). A
        # non-blocking broadcast read a step later would still have to wait for the GPU to drain (the flag's
        # copy to the host queues behind that step's kernels) unless copied to pinned memory and polled
        # with an event: more machinery for the same bound on the overrun.
        shared_clock = self.dist.enabled and tcfg.max_seconds is not None
        done = distributed.broadcast_flag(self.budget_used() >= 1.0, self.device)
        self.open_tensorboard()
        try:
            while not done:
                started = time.perf_counter()
                named, images = self.run_step()
                # Without a sync the clock measures launches; the sync before any host work below adds the rest.
                step_seconds = time.perf_counter() - started
                seconds_before = self.train_seconds
                self.train_seconds += step_seconds
                self.images_seen += images
                window.add(named, step_seconds, images)
                if not shared_clock:
                    done = self.budget_used() >= 1.0
                elif self.step % tcfg.log_every == 0:  # rank 0's clock decides, for every process
                    done = distributed.broadcast_flag(self.budget_used() >= 1.0, self.device)
                else:  # steps and images only: the same on every process, no communication
                    done = self.budget_used(clock=False) >= 1.0
                log_now = self.step % tcfg.log_every == 0 or done
                grid_now = draws and bool(tcfg.sample_every) and self.step % tcfg.sample_every == 0
                save_now = self.step % tcfg.checkpoint_every == 0 or done
                callbacks_now = not done and any(c.due(self.step, seconds_before, self.train_seconds)
                                                 for c in self.callbacks)
                if log_now or grid_now or save_now or callbacks_now:
                    tick = time.perf_counter()
                    self._sync()  # the queued GPU work of this window belongs to training time
                    lag = time.perf_counter() - tick
                    self.train_seconds += lag
                    window.seconds += lag
                if log_now:
                    last_row = self.log_window(window, progress)
                    window = LogWindow(self.step)
                if grid_now and main:
                    self.write_samples()
                    last_grid_step = self.step
                if callbacks_now:
                    self.run_callbacks(seconds_before)
                if save_now:
                    self.save()
            progress.close()
            if main:
                if draws and last_grid_step != self.step:
                    self.write_samples()
                self.run_callbacks(final=True)
        finally:
            progress.close()
            self.close_tensorboard()
        losses = {k: v for k, v in last_row.items() if k.startswith(("loss/", "grad_norm/"))}
        return TrainResult(self.run_dir, self.step, self.last_checkpoint, self.images_seen, self.train_seconds, losses)

    def log_window(self, window: "LogWindow", progress: TrainingProgress) -> dict[str, Any]:
        """The row of ``metrics.jsonl`` for the steps since the last one: the window's averages (over the
        processes too), speed and learning rates; the NaN guard of ``nan_check=log`` reads it."""
        keys = sorted(window.sums)
        stacked = distributed.all_reduce_mean(torch.stack([window.sums[k] / window.counts[k] for k in keys]))
        averages = dict(zip(keys, stacked.tolist()))
        if self.settings.nan_check == "log":
            self.check_finite({k: torch.tensor(v) for k, v in averages.items()},
                              f" (averaged over steps {window.start_step + 1}-{self.step})", same_everywhere=True)
        row = {"step": self.step, "epoch": self.stream.epoch, "images_seen": self.images_seen,
               "train_seconds": round(self.train_seconds, 3),
               "images_per_s": round(window.images / window.seconds, 2) if window.seconds else None,
               **{f"lr/{n}": s.get_last_lr()[0] for n, s in self.schedulers.items()}, **averages}
        self.log_row(row)
        progress.update(self.step, self.budget_used(),
                        {k.removeprefix("loss/"): v for k, v in averages.items() if k.startswith("loss/")})
        return row
