"""The model-agnostic training harness.

It knows devices, precision, gradient clipping, LR warm-up, EMA, checkpoints, resumption,
logging, sample grids and the NaN guard. It knows nothing about GANs, VAEs or diffusion: a
family (a :class:`lab_utils.lab.Lab`) gives it named optimisers and a ``training_step`` that
calls ``ctx.optimize(name, loss)`` for each update and ``ctx.next_batch()`` for more data.

Resumption is exact on CPU: the checkpoint holds the step, the optimiser/LR/EMA states, the
position in the data order (epoch e visits a permutation seeded by ``seed + e``) and the
torch RNG state, so a killed-and-resumed run produces the same numbers as an uninterrupted one.

Several processes (``torchrun``, see :mod:`lab_utils.distributed`): the lab is wrapped in
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
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lab_utils import distributed

from lab_utils.checkpoint import (  # noqa: I001
    CheckpointError, build_lab, checkpoint_dir, load_checkpoint, load_state_into, save_checkpoint,
)
from lab_utils.config import to_container
from lab_utils.ema import EMA
from lab_utils.lab import DataInfo, Lab
from lab_utils.plotting import save_grid
from lab_utils.progress import Progress
from lab_utils.run_folder import (
    ResumeSource, RunFolderError, RunLock, foreign_files, holds_run, remove_temporaries, resume_source,
)

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


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: cuda, then mps, then cpu. An explicit device that is not there is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={name} but CUDA is not available here; use trainer.device=auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("trainer.device=mps but MPS is not available here; use trainer.device=auto or cpu")
    return torch.device(name)


def move_to(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        return batch.contiguous(memory_format=torch.channels_last) if channels_last and batch.dim() == 4 else batch
    if isinstance(batch, dict):
        return {key: move_to(value, device, channels_last) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(move_to(value, device, channels_last) for value in batch)
    return batch


class DataStream:
    """An endless, resumable stream of batches, sharded over the processes of a distributed run.

    Epoch ``e`` visits ``randperm(n)`` seeded by ``seed + e`` (``DistributedSampler``'s order), cut
    into global batches of ``batch_size * world_size``; process ``r`` takes the items ``r, r + W, ...``
    of each global batch, so the processes together see exactly the single-process batches. The
    position is counted in global batches, so a run resumes with another number of processes.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, device: torch.device, num_workers: int = 0,
                 rank: int = 0, world_size: int = 1, pin_memory: bool = True, channels_last: bool = False):
        self.global_batch = batch_size * world_size
        if len(dataset) < self.global_batch:
            raise ValueError(
                f"the training set has {len(dataset)} items, fewer than one global batch of {self.global_batch} "
                f"({world_size} process(es) x {batch_size}); lower trainer.batch_size or use more data (data.subset)"
            )
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.device, self.num_workers, self.rank, self.world_size = device, num_workers, rank, world_size
        self.pin_memory = pin_memory and device.type == "cuda"
        self.channels_last = channels_last
        self.epoch, self.position = 0, 0  # position = global batches already taken from this epoch
        self._batches: Iterator | None = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch  # the last partial batch is dropped

    def _start_epoch(self) -> Iterator:
        sampler = DistributedSampler(self.dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                     seed=self.seed, drop_last=True)
        sampler.set_epoch(self.epoch)  # reshuffle: randperm seeded by seed + epoch
        mine = torch.tensor(list(sampler))[: self.batches_per_epoch * self.batch_size]  # this process's items
        batches = mine.view(-1, self.batch_size)[self.position:].tolist()  # (batches left, B)
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                            pin_memory=self.pin_memory, persistent_workers=False)
        return iter(loader)

    def __iter__(self) -> "DataStream":
        return self

    def __next__(self) -> dict[str, Any]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position, self._batches = self.epoch + 1, 0, None
        if self._batches is None:
            self._batches = self._start_epoch()
        batch = next(self._batches)
        self.position += 1
        return move_to(batch, self.device, self.channels_last)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._batches = int(state["epoch"]), int(state["position"]), None
        saved = int(state.get("global_batch", self.global_batch))
        if saved != self.global_batch:  # per-process batches with another number of processes
            self.position = math.ceil(self.position * saved / self.global_batch)
            log.warning("the checkpoint's global batch was %d, now %d: continuing at the first batch of this "
                        "epoch not yet fully seen (some items of the epoch are skipped)", saved, self.global_batch)


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up: lr_k = lr * min(1, (k + 1) / warmup_steps)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min(1.0, (k + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    )


class _LossFunction(nn.Module):
    """What DDP wraps: its forward calls the lab's loss function, so DDP sees every parameter the loss used.

    (A family's networks are called inside ``fn``; the parameters are the lab's own, so DDP's gradient
    hooks fire whatever method of the lab computed the loss.)"""

    def __init__(self, lab: Lab):
        super().__init__()
        self.lab = lab

    def forward(self, fn: Callable[[], Any]) -> Any:
        return fn()


def _loss_of(output: Any) -> torch.Tensor:
    loss = output.get("loss") if isinstance(output, dict) else output
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise TypeError("a loss function given to ctx.optimize must return a 0-dim tensor or a dict holding one "
                        f"under 'loss', got {type(output).__name__}")
    return loss


class _StepContext:
    """What ``Lab.training_step`` sees (the ``StepContext`` protocol of ``lab_utils.lab``)."""

    def __init__(self, trainer: "Trainer"):
        self._trainer = trainer
        self.step = trainer.step
        self.device = trainer.device
        self.images = 0  # images drawn by this process during this step (for images/s)
        self.grad_norms: dict[str, torch.Tensor] = {}

    def optimize(self, name: str, loss: Callable[[], Any] | torch.Tensor) -> Any:
        """One update of optimiser ``name``: compute the loss, backward, clip, step, LR schedule.

        ``loss`` is a function of no arguments returning the loss (a 0-dim tensor, or a dict holding it
        under ``"loss"`` beside statistics); it runs under the trainer's precision and, with several
        processes, inside DDP's forward so that the backward averages gradients over the processes.
        Returns what the function returned. A tensor computed beforehand is accepted in a single process.
        """
        trainer = self._trainer
        if name not in trainer.optimizers:
            raise KeyError(f"ctx.optimize({name!r}): the lab's optimisers are {sorted(trainer.optimizers)}")
        if callable(loss):
            with trainer.autocast():
                output = trainer.loss_module(loss)
        elif trainer.ddp is not None:
            raise TypeError(f"ctx.optimize({name!r}, <tensor>) cannot average gradients over processes: pass a "
                            "function that computes the loss, e.g. ctx.optimize(name, lambda: self.loss(batch))")
        else:
            output = loss
        value = _loss_of(output)
        if trainer.cfg.trainer.nan_check == "step":
            trainer.check_finite({f"loss for {name!r}": value.detach()})
        optimizer = trainer.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        scaler = trainer.scalers.get(name)
        (scaler.scale(value) if scaler is not None else value).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        clip = trainer.cfg.trainer.grad_clip
        # clip_grad_norm_ returns the total norm before clipping; inf max_norm = measure only.
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else math.inf)
        if scaler is not None:
            scaler.step(optimizer)  # skipped when the scaled gradients overflowed
            scaler.update()
        else:
            optimizer.step()
        trainer.schedulers[name].step()
        self.grad_norms[name] = norm.detach()
        return output

    def next_batch(self) -> dict[str, Any]:
        batch = next(self._trainer.stream)
        self.images += len(batch["image"])
        return batch

    def autocast(self) -> contextlib.AbstractContextManager:
        return self._trainer.autocast()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX tiles or AVX-512 BF16), where oneDNN runs bf16
    matmuls and convolutions several times faster than fp32; elsewhere bf16 is emulated and slower."""
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def effective_precision(precision: str, device: torch.device) -> str:
    """What ``trainer.precision`` trains in on ``device``: bf16 on CUDA and on CPUs that multiply bf16 in
    hardware, fp16 on CUDA only, fp32 everywhere else (emulated bf16 would be slower than fp32)."""
    if precision == "fp16" and device.type == "cuda":
        return "fp16"
    if precision == "bf16" and (device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())):
        return "bf16"
    return "fp32"


def precision_autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast of ``trainer.precision`` on ``device`` (see ``effective_precision``)."""
    return _autocast(effective_precision(precision, device), device)


def _autocast(effective: str, device: torch.device) -> contextlib.AbstractContextManager:
    if effective == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if effective == "bf16" else torch.float16)


def speed_setup(lab: Lab, cfg: DictConfig, device: torch.device) -> Lab:
    """Apply the trainer's speed switches to a lab on ``device`` (TF32, channels_last, torch.compile)."""
    tcfg = cfg.trainer
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(tcfg.tf32)
        torch.backends.cudnn.allow_tf32 = bool(tcfg.tf32)
    if tcfg.channels_last:
        lab = lab.to(memory_format=torch.channels_last)  # 4-d weights (convolutions) become NHWC
    if tcfg.compile:
        blocker = lab.compile_blocker()
        if blocker:
            raise ValueError(f"trainer.compile=true cannot train {cfg.model.name} as configured: {blocker}; "
                             "use trainer.compile=false")
        for name, child in lab.named_children():
            if any(True for _ in child.parameters()):
                child.compile()  # in place: the state_dict keys do not change
                log.info("compiled %s.%s", type(lab).__name__, name)
    return lab


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path, lab: Lab, train_set: Dataset, data_info: DataInfo,
                 device: torch.device, callbacks: tuple[Callback, ...] = (),
                 dist_info: distributed.DistInfo = distributed.DistInfo()):
        self.cfg, self.run_dir, self.lab, self.data_info, self.device = cfg, run_dir, lab, data_info, device
        self.dist = dist_info
        self.callbacks = tuple(callbacks) if dist_info.is_main else ()
        tcfg = cfg.trainer
        self.optimizers = lab.configure_optimizers()
        if not self.optimizers:
            raise ValueError(f"{type(lab).__name__}.configure_optimizers() returned no optimiser")
        self.schedulers = {name: warmup_schedule(opt, tcfg.warmup_steps) for name, opt in self.optimizers.items()}
        self.precision = effective_precision(tcfg.precision, device)  # resolved once, not on every step
        fp16 = self.precision == "fp16"
        self.scalers = {name: torch.amp.GradScaler("cuda") for name in self.optimizers} if fp16 else {}
        # The EMA, logs, grids and checkpoints live on rank 0 only.
        use_ema = tcfg.ema_decay > 0 and dist_info.is_main
        self.ema = EMA(lab, lab.ema_modules(), tcfg.ema_decay, tcfg.ema_start) if use_ema else None
        world = dist_info.world_size
        if tcfg.batch_scope == "global" and tcfg.batch_size % world:
            raise ValueError(f"trainer.batch_size={tcfg.batch_size} (the global batch) does not split over {world} "
                             "processes; choose a multiple of the number of processes or trainer.batch_scope=per_process")
        per_process = tcfg.batch_size // world if tcfg.batch_scope == "global" else tcfg.batch_size
        self.stream = DataStream(train_set, per_process, cfg.seed, device, tcfg.num_workers, dist_info.rank, world,
                                 channels_last=tcfg.channels_last)
        self.loss_module: nn.Module = _LossFunction(lab)
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
        self.writer = self._tensorboard() if tcfg.tensorboard and dist_info.is_main else None
        if self.precision != tcfg.precision:
            where = device.type
            if device.type == "cpu" and tcfg.precision == "bf16":
                where = "a CPU without AMX or AVX-512 BF16"
            log.warning("trainer.precision=%s is not used on %s; training in fp32", tcfg.precision, where)

    def release(self) -> None:
        """Drop the DDP wrapper (before the process group is destroyed: see ``lab_utils.distributed``)."""
        self.loss_module = _LossFunction(self.lab)
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
        tcfg = self.cfg.trainer
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
        return _autocast(self.precision, self.device)

    def diverged_message(self, what: str, value: torch.Tensor) -> str:
        kept = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written yet"
        return (f"{what} became {value.float().flatten()[0].item()} at step {self.step + 1}; training stopped and "
                f"{kept}. Try a lower learning rate, trainer.grad_clip=1.0, a longer trainer.warmup_steps, "
                "or trainer.precision=fp32.")

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("trainer.tensorboard=true needs the tensorboard package: pip install 'genlab[tensorboard]'") from None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

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
        tcfg = self.cfg.trainer
        prompts = list(self.data_info.prompts[: tcfg.num_sample_prompts]) or [""]
        prompts = [p for p in prompts for _ in range(tcfg.samples_per_prompt)]
        generator = torch.Generator(device=self.device).manual_seed(tcfg.sample_seed)
        with self.sampling_weights():
            images = self.lab.sample(prompts, generator=generator, **self.lab.sample_options(tcfg.sample_options))
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
    def budget_used(self) -> float:
        """The fraction of the budget spent: the largest of steps, images and seconds (1.0 = done)."""
        tcfg = self.cfg.trainer
        fractions = [self.step / tcfg.steps]
        if tcfg.max_images is not None:
            fractions.append(self.images_seen / tcfg.max_images)
        if tcfg.max_seconds is not None:
            fractions.append(self.train_seconds / tcfg.max_seconds)
        return max(fractions)

    def run_step(self) -> tuple[dict[str, torch.Tensor], int]:
        """One training step of the lab: its named values (losses, statistics, gradient norms; tensors
        still on the device) and the number of images all processes drew. No host-device sync unless
        ``trainer.nan_check=step``."""
        ctx = _StepContext(self)
        losses = self.lab.training_step(ctx.next_batch(), ctx)
        named = {**{f"loss/{k}" if "/" not in k else k: torch.as_tensor(v, device=self.device).detach().float()
                    for k, v in losses.items()},
                 **{f"grad_norm/{k}": v for k, v in ctx.grad_norms.items()}}
        if self.cfg.trainer.nan_check == "step":
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
        tcfg = self.cfg.trainer
        self.lab.train()
        main = self.dist.is_main
        progress = Progress(enabled=tcfg.progress and main, start=self.budget_used())
        sums: dict[str, torch.Tensor] = {}
        count, window_seconds, window_images, last_row = 0, 0.0, 0, {}
        last_grid_step, window_start_step = -1, self.step
        # With several processes every one must stop at the same step: the step and image budgets
        # agree by construction, a time budget is decided by rank 0 (one small broadcast per step).
        shared_clock = self.dist.enabled and tcfg.max_seconds is not None
        done = distributed.broadcast_flag(self.budget_used() >= 1.0, self.device)
        try:
            while not done:
                started = time.perf_counter()
                named, images = self.run_step()
                for key, value in named.items():
                    sums[key] = sums.get(key, 0.0) + value
                # Without a sync the clock measures launches; the sync before any host work below adds the rest.
                step_seconds = time.perf_counter() - started
                seconds_before = self.train_seconds
                self.train_seconds += step_seconds
                self.images_seen += images
                window_seconds += step_seconds
                window_images += images
                count += 1
                done = self.budget_used() >= 1.0
                if shared_clock:
                    done = distributed.broadcast_flag(done, self.device)
                log_now = self.step % tcfg.log_every == 0 or done
                grid_now = bool(tcfg.sample_every) and self.step % tcfg.sample_every == 0
                save_now = self.step % tcfg.checkpoint_every == 0 or done
                callbacks_now = not done and any(c.due(self.step, seconds_before, self.train_seconds)
                                                 for c in self.callbacks)
                if log_now or grid_now or save_now or callbacks_now:
                    tick = time.perf_counter()
                    self._sync()  # the queued GPU work of this window belongs to training time
                    lag = time.perf_counter() - tick
                    self.train_seconds += lag
                    window_seconds += lag

                if log_now:
                    keys = sorted(sums)
                    stacked = distributed.all_reduce_mean(torch.stack([sums[k] for k in keys]) / count)
                    averages = dict(zip(keys, stacked.tolist()))
                    if tcfg.nan_check == "log":
                        self.check_finite({k: torch.tensor(v) for k, v in averages.items()},
                                          f" (averaged over steps {window_start_step + 1}-{self.step})",
                                          same_everywhere=True)
                    last_row = {"step": self.step, "epoch": self.stream.epoch, "images_seen": self.images_seen,
                                "train_seconds": round(self.train_seconds, 3),
                                "images_per_s": round(window_images / window_seconds, 2) if window_seconds else None,
                                **{f"lr/{n}": s.get_last_lr()[0] for n, s in self.schedulers.items()},
                                **averages}
                    self.log_row(last_row)
                    progress.update(self.step, self.budget_used(), {k.removeprefix("loss/"): v for k, v in
                                                                    averages.items() if k.startswith("loss/")})
                    sums, count, window_seconds, window_images, window_start_step = {}, 0, 0.0, 0, self.step
                if grid_now and main:
                    self.write_samples()
                    last_grid_step = self.step
                if callbacks_now:
                    self.run_callbacks(seconds_before)
                if save_now:
                    self.save()
        finally:
            progress.close()
            if self.writer is not None:
                self.writer.close()
        if main:
            if last_grid_step != self.step:
                self.write_samples()
            self.run_callbacks(final=True)
        losses = {k: v for k, v in last_row.items() if k.startswith(("loss/", "grad_norm/"))}
        return TrainResult(self.run_dir, self.step, self.last_checkpoint, self.images_seen, self.train_seconds, losses)


def _metrics_up_to(path: Path, step: int) -> list[str]:
    """The rows of a ``metrics.jsonl`` logged at or before ``step`` (a killed run logs past its checkpoint)."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
    return kept


def _continue_metrics(source_run: Path | None, run_dir: Path, step: int) -> None:
    """``run_dir/metrics.jsonl`` holds the rows up to ``step``: no duplicates after a kill, and a run continued
    into a new folder starts with the history of the run it came from."""
    rows = _metrics_up_to((source_run or run_dir) / "metrics.jsonl", step)
    if rows or (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in rows))


def train(cfg: DictConfig, resume: str | Path | None = None, callbacks: tuple[Callback, ...] = ()) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` into ``cfg.run_dir``, or continue from the checkpoint at ``resume``.

    ``cfg`` must be a validated config (``lab_utils.config.validate``). When resuming it is the run's
    saved config with the caller's overrides applied (see ``lab_utils.cli``), and ``resume`` is a run
    folder or a checkpoint in one; the run continues in ``cfg.run_dir``, which is either that run folder
    or a new folder (a checkpoint outside any run folder continues only into a new one). Rank 0 holds the
    run folder's lock for the whole training (``lab_utils.run_folder``). Under torchrun every process
    calls this; they join one process group for the run and leave it at the end.
    """
    dist_info, owns_group = distributed.setup(cfg.trainer.device, cfg.trainer.dist_backend)
    clean = False
    try:
        with RunLock(cfg.run_dir) if dist_info.is_main else contextlib.nullcontext():
            result = _train(cfg, resume, callbacks, dist_info)
        clean = True
        return result
    finally:
        if owns_group:
            distributed.teardown(clean)


def _open_run(cfg: DictConfig, resume: str | Path | None) -> tuple[Path, ResumeSource | None, dict[str, Any] | None]:
    """Rank 0, holding the lock: the run folder, where it resumes from, and the checkpoint (None: a new run)."""
    run_dir = Path(cfg.run_dir)
    remove_temporaries(run_dir)
    foreign = foreign_files(run_dir)
    if foreign:  # e.g. run_dir=. in a project folder: its config.yaml would be overwritten
        shown = ", ".join(foreign[:5])
        raise RunFolderError(f"run_dir={run_dir} holds files a run does not write ({shown}); a run writes config.yaml, "
                             "metrics.jsonl, train.log, checkpoints/ and samples/ there: choose a new or empty folder")
    if resume is None:
        if holds_run(run_dir):
            raise FileExistsError(
                f"{run_dir} already holds a run with checkpoints; continue it with `genlab train resume={run_dir}` "
                "or choose another run_dir"
            )
        return run_dir, None, None
    source = resume_source(resume)
    if source.run_dir is None or source.run_dir.resolve() != run_dir.resolve():  # continued into a new folder
        if holds_run(run_dir):
            raise FileExistsError(f"run_dir={run_dir} already holds a run; to continue {source.checkpoint} in a new "
                                  "folder, choose one that holds no checkpoints")
    state = load_checkpoint(source.checkpoint)
    saved = state["config"]
    if saved["model"]["name"] != cfg.model.name or saved["data"]["name"] != cfg.data.name:
        raise CheckpointError(
            f"{source.checkpoint} belongs to model={saved['model']['name']} data={saved['data']['name']}, "
            f"not model={cfg.model.name} data={cfg.data.name}"
        )
    return run_dir, source, state


def _train(cfg: DictConfig, resume: str | Path | None, callbacks: tuple[Callback, ...],
           dist_info: distributed.DistInfo) -> TrainResult:
    from lab_utils.data import build_dataset

    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.trainer.device)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    if not dist_info.is_main:
        logging.getLogger("genlab").setLevel(logging.WARNING)  # one process reports
    run_dir = source = state = None
    if dist_info.is_main:
        run_dir, source, state = _open_run(cfg, resume)
    # The others take rank 0's run directory (its ${now:...} is the one) and checkpoint: no shared disk needed.
    run_dir, source, state = distributed.broadcast_object((run_dir, source, state) if dist_info.is_main else None)
    # The dataset: rank 0 first (it writes the cache or downloads), then one process per node, then the rest.
    train_set = distributed.in_turn(lambda: build_dataset(cfg.data, "train"), dist_info)
    data_info = DataInfo.from_dict(state["data_info"]) if state else train_set.data_info()
    lab = speed_setup(build_lab(cfg, data_info).to(device), cfg, device)
    if dist_info.rank > 0:
        torch.manual_seed(cfg.seed + dist_info.rank)  # its own noise; the weights come from rank 0 (DDP)
    trainer = Trainer(cfg, run_dir, lab, train_set, data_info, device, callbacks, dist_info)
    if state is not None:
        trainer.load_state_dict(state, source.checkpoint)
        trainer.last_checkpoint = source.checkpoint if source.run_dir == run_dir else None
        if trainer.budget_used() >= 1.0:  # every process decides the same: the state is the same
            tcfg = cfg.trainer
            raise RunFolderError(
                f"the run at {source.checkpoint} is already at step {trainer.step} ({trainer.images_seen} images, "
                f"{trainer.train_seconds:.0f} s), which meets its budget (trainer.steps={tcfg.steps}, "
                f"max_images={tcfg.max_images}, max_seconds={tcfg.max_seconds}); to train further, raise it, "
                f"e.g. trainer.steps={trainer.step + tcfg.steps}"
            )
    if dist_info.is_main:
        # Nothing is written into the run directory before the data, model and checkpoint all loaded.
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        _add_file_log(run_dir / "train.log")
        _continue_metrics(source.run_dir if source else None, run_dir, trainer.step)
        if state is not None:
            log.info("resumed %s at step %d (%d process(es); the checkpoint was written by %d)%s", source.checkpoint,
                     trainer.step, dist_info.world_size, state["trainer"].get("world_size", 1),
                     "" if source.run_dir == run_dir else f", continuing in the new folder {run_dir}")
    n_params = sum(p.numel() for p in lab.parameters())
    log.info("training %s (%.2fM parameters) on %s (%d images) on %s%s into %s", cfg.model.name, n_params / 1e6,
             cfg.data.name, len(train_set), device,
             f" x {dist_info.world_size} processes" if dist_info.enabled else "", run_dir)
    try:
        result = trainer.fit()
    finally:
        trainer.release()
    log.info("done: step %d, %d images in %.1f s (%.1f images/s); checkpoint %s", result.step,
             result.images_seen, result.train_seconds, result.images_per_second, result.checkpoint)
    return result


def _add_file_log(path: Path) -> None:
    root = logging.getLogger("genlab")
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in root.handlers):
        return
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
