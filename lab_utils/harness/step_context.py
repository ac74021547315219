"""What ``Lab.training_step`` talks to: the step context (``ctx.optimize``, ``ctx.next_batch``).

``ctx.optimize(name, loss_fn)`` is one parameter update: the loss under the trainer's precision (inside
DistributedDataParallel's forward with several processes, so the backward averages the gradients),
backward, gradient clipping, the optimiser's step and its learning-rate schedule's step. The trainer
(:mod:`lab_utils.harness.trainer`) owns the optimisers, schedules and scalers; the context only uses them.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
from torch import nn

from lab_utils.core.lab import Lab

class LossFunction(nn.Module):
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


class TrainingStepContext:
    """What ``Lab.training_step`` gets: the trainer's implementation of ``lab_utils.core.lab.StepContext``."""

    def __init__(self, trainer: Any):  # a lab_utils.harness.trainer.Trainer (which imports this module)
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
        if trainer.settings.nan_check == "step":
            trainer.check_finite({f"loss for {name!r}": value.detach()})
        optimizer = trainer.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        scaler = trainer.scalers.get(name)
        (scaler.scale(value) if scaler is not None else value).backward()
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradients
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        clip = trainer.settings.grad_clip
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
