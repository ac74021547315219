"""The model-agnostic training harness.

It knows devices, precision, gradient clipping, LR warm-up, EMA, checkpoints, resumption,
logging, sample grids and the NaN guard. It knows nothing about GANs, VAEs or diffusion: a
family (a :class:`lab_utils.lab.Lab`) gives it named optimisers and a ``training_step`` that
calls ``ctx.optimize(name, loss)`` for each update and ``ctx.next_batch()`` for more data.

Resumption is exact on CPU: the checkpoint holds the step, the optimiser/LR/EMA states, the
position in the data order (epoch e visits a permutation seeded by ``seed + e``) and the
torch RNG state, so a killed-and-resumed run produces the same numbers as an uninterrupted one.
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
from torch.utils.data import DataLoader, Dataset

from lab_utils.checkpoint import (
    CheckpointError, build_lab, list_checkpoints, load_checkpoint, load_state_into, resolve_checkpoint,
    save_checkpoint,
)
from lab_utils.config import to_container
from lab_utils.ema import EMA
from lab_utils.lab import DataInfo, Lab
from lab_utils.plotting import save_grid
from lab_utils.progress import Progress

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


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: move_to(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(move_to(value, device) for value in batch)
    return batch


class DataStream:
    """An endless, resumable stream of batches. Epoch ``e`` visits ``randperm`` seeded by ``seed + e``."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, device: torch.device, num_workers: int = 0):
        if len(dataset) < batch_size:
            raise ValueError(
                f"the training set has {len(dataset)} items, fewer than trainer.batch_size={batch_size}; "
                "lower trainer.batch_size or use more data (data.subset)"
            )
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.device, self.num_workers = device, num_workers
        self.epoch, self.position = 0, 0  # position = batches already taken from this epoch
        self._batches: Iterator | None = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // self.batch_size  # the last partial batch is dropped

    def _start_epoch(self) -> Iterator:
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        batches = order[: self.batches_per_epoch * self.batch_size].view(-1, self.batch_size)
        remaining = batches[self.position:].tolist()
        loader = DataLoader(self.dataset, batch_sampler=remaining, num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=False)
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
        return move_to(batch, self.device)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._batches = int(state["epoch"]), int(state["position"]), None


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up: lr_k = lr * min(1, (k + 1) / warmup_steps)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min(1.0, (k + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    )


class _StepContext:
    """What ``Lab.training_step`` sees (the ``StepContext`` protocol of ``lab_utils.lab``)."""

    def __init__(self, trainer: "Trainer"):
        self._trainer = trainer
        self.step = trainer.step
        self.device = trainer.device
        self.images = 0  # images drawn during this step (for images/s)
        self.grad_norms: dict[str, torch.Tensor] = {}

    def optimize(self, name: str, loss: torch.Tensor) -> torch.Tensor:
        trainer = self._trainer
        if name not in trainer.optimizers:
            raise KeyError(f"ctx.optimize({name!r}): the lab's optimisers are {sorted(trainer.optimizers)}")
        if not torch.isfinite(loss.detach()).all():
            raise TrainingDiverged(trainer.diverged_message(f"loss for {name!r}", loss.detach()))
        optimizer = trainer.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        clip = trainer.cfg.trainer.grad_clip
        # clip_grad_norm_ returns the total norm before clipping; inf max_norm = measure only.
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else math.inf)
        optimizer.step()
        trainer.schedulers[name].step()
        self.grad_norms[name] = norm.detach()
        return norm.detach()

    def next_batch(self) -> dict[str, Any]:
        batch = next(self._trainer.stream)
        self.images += len(batch["image"])
        return batch

    def autocast(self) -> contextlib.AbstractContextManager:
        return self._trainer.autocast()


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path, lab: Lab, train_set: Dataset, data_info: DataInfo,
                 device: torch.device, callbacks: tuple[Callback, ...] = ()):
        self.cfg, self.run_dir, self.lab, self.data_info, self.device = cfg, run_dir, lab, data_info, device
        self.callbacks = tuple(callbacks)
        tcfg = cfg.trainer
        self.optimizers = lab.configure_optimizers()
        if not self.optimizers:
            raise ValueError(f"{type(lab).__name__}.configure_optimizers() returned no optimiser")
        self.schedulers = {name: warmup_schedule(opt, tcfg.warmup_steps) for name, opt in self.optimizers.items()}
        self.ema = EMA(lab, lab.ema_modules(), tcfg.ema_decay, tcfg.ema_start) if tcfg.ema_decay > 0 else None
        self.stream = DataStream(train_set, tcfg.batch_size, cfg.seed, device, tcfg.num_workers)
        self.step, self.images_seen, self.train_seconds = 0, 0, 0.0
        self.last_checkpoint: Path | None = None
        self.writer = self._tensorboard() if tcfg.tensorboard else None
        if tcfg.precision == "bf16" and device.type != "cuda":
            log.warning("trainer.precision=bf16 is used on CUDA only; training in fp32 on %s", device.type)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "config": to_container(self.cfg),
            "data_info": self.data_info.to_dict(),
            "model": self.lab.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "schedulers": {name: sched.state_dict() for name, sched in self.schedulers.items()},
            "trainer": {"step": self.step, "images_seen": self.images_seen, "train_seconds": self.train_seconds,
                        "data": self.stream.state_dict()},
            "rng": rng,
        }

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        load_state_into(self.lab, state["model"], path, self.cfg.model.name)
        if set(state["optimizers"]) != set(self.optimizers):
            raise CheckpointError(f"{path} has optimisers {sorted(state['optimizers'])}, the model {sorted(self.optimizers)}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
            self.schedulers[name].load_state_dict(state["schedulers"][name])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        counters = state["trainer"]
        self.step, self.images_seen = int(counters["step"]), int(counters["images_seen"])
        self.train_seconds = float(counters["train_seconds"])
        self.stream.load_state_dict(counters["data"])
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def save(self) -> Path:
        tcfg = self.cfg.trainer
        self.last_checkpoint = save_checkpoint(self.state_dict(), self.run_dir, self.step, tcfg.keep_checkpoints)
        return self.last_checkpoint

    # ---------------------------------------------------------------- helpers
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.trainer.precision == "bf16" and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

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
            images = self.lab.sample(prompts, generator=generator, **dict(tcfg.sample_options))
        return save_grid(images, self.run_dir / "samples" / f"step_{self.step:06d}.png", captions=prompts,
                         ncols=tcfg.samples_per_prompt, title=f"{self.cfg.model.name} step {self.step}")

    def log_row(self, row: dict[str, Any]) -> None:
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

    def fit(self) -> TrainResult:
        tcfg = self.cfg.trainer
        self.lab.train()
        progress = Progress(enabled=tcfg.progress, start=self.budget_used())
        sums: dict[str, torch.Tensor] = {}
        count, window_seconds, window_images, last_row = 0, 0.0, 0, {}
        last_grid_step = -1
        done = self.budget_used() >= 1.0
        try:
            while not done:
                started = time.perf_counter()
                ctx = _StepContext(self)
                losses = self.lab.training_step(ctx.next_batch(), ctx)
                named = {**{f"loss/{k}" if "/" not in k else k: v for k, v in losses.items()},
                         **{f"grad_norm/{k}": v for k, v in ctx.grad_norms.items()}}
                for key, value in named.items():
                    value = torch.as_tensor(value).detach().float()
                    if not torch.isfinite(value).all():
                        raise TrainingDiverged(self.diverged_message(key, value))
                    sums[key] = sums.get(key, 0.0) + value
                self.step += 1
                if self.ema is not None:
                    self.ema.update(self.lab, self.step)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                step_seconds = time.perf_counter() - started
                seconds_before = self.train_seconds
                self.train_seconds += step_seconds
                self.images_seen += ctx.images
                window_seconds += step_seconds
                window_images += ctx.images
                count += 1
                done = self.budget_used() >= 1.0

                if self.step % tcfg.log_every == 0 or done:
                    averages = {key: (value / count).item() for key, value in sums.items()}
                    last_row = {"step": self.step, "epoch": self.stream.epoch, "images_seen": self.images_seen,
                                "train_seconds": round(self.train_seconds, 3),
                                "images_per_s": round(window_images / window_seconds, 2) if window_seconds else None,
                                **{f"lr/{n}": s.get_last_lr()[0] for n, s in self.schedulers.items()},
                                **averages}
                    self.log_row(last_row)
                    progress.update(self.step, self.budget_used(), {k.removeprefix("loss/"): v for k, v in
                                                                    averages.items() if k.startswith("loss/")})
                    sums, count, window_seconds, window_images = {}, 0, 0.0, 0
                if tcfg.sample_every and self.step % tcfg.sample_every == 0:
                    self.write_samples()
                    last_grid_step = self.step
                if not done:
                    self.run_callbacks(seconds_before)
                if self.step % tcfg.checkpoint_every == 0 or done:
                    self.save()
        finally:
            progress.close()
            if self.writer is not None:
                self.writer.close()
        if last_grid_step != self.step:
            self.write_samples()
        self.run_callbacks(final=True)
        if self.last_checkpoint is None:  # resumed a run that was already finished
            self.last_checkpoint = resolve_checkpoint(self.run_dir)
        losses = {k: v for k, v in last_row.items() if k.startswith(("loss/", "grad_norm/"))}
        return TrainResult(self.run_dir, self.step, self.last_checkpoint, self.images_seen, self.train_seconds, losses)


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop rows a killed run logged after its last checkpoint, so the resumed log has no duplicates."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
    path.write_text("".join(line + "\n" for line in kept))


def train(cfg: DictConfig, resume: str | Path | None = None, callbacks: tuple[Callback, ...] = ()) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` into ``cfg.run_dir`` (or continue the run at ``resume``).

    ``cfg`` must be a validated config (``lab_utils.config.validate``); when resuming it is the
    run's saved config with the caller's overrides applied (see ``lab_utils.cli``).
    """
    from lab_utils.data import build_dataset

    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.trainer.device)
    state = None
    if resume is not None:
        path = resolve_checkpoint(resume)
        state = load_checkpoint(path)
        saved = state["config"]
        if saved["model"]["name"] != cfg.model.name or saved["data"]["name"] != cfg.data.name:
            raise CheckpointError(
                f"{path} belongs to model={saved['model']['name']} data={saved['data']['name']}, "
                f"not model={cfg.model.name} data={cfg.data.name}"
            )
        run_dir = path.parent.parent
    else:
        run_dir = Path(cfg.run_dir)
        if list_checkpoints(run_dir) or (run_dir / "checkpoints" / "last.pt").exists():
            raise FileExistsError(
                f"{run_dir} already holds a run with checkpoints; continue it with `genlab train resume={run_dir}` "
                "or choose another run_dir"
            )
    train_set = build_dataset(cfg.data, "train")
    data_info = DataInfo.from_dict(state["data_info"]) if state else train_set.data_info()
    lab = build_lab(cfg, data_info).to(device)
    trainer = Trainer(cfg, run_dir, lab, train_set, data_info, device, callbacks)
    if state is not None:
        trainer.load_state_dict(state, path)
        trainer.last_checkpoint = path
    # Nothing is written into the run directory before the data, model and checkpoint all loaded.
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    _add_file_log(run_dir / "train.log")
    if state is not None:
        _truncate_metrics(run_dir, trainer.step)
        log.info("resumed %s at step %d", path, trainer.step)
    n_params = sum(p.numel() for p in lab.parameters())
    log.info("training %s (%.2fM parameters) on %s (%d images) on %s into %s", cfg.model.name, n_params / 1e6,
             cfg.data.name, len(train_set), device, run_dir)
    result = trainer.fit()
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
