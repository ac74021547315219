"""Exponential moving average of chosen submodules' weights.

$\\theta_{\\text{ema}} \\leftarrow d\\,\\theta_{\\text{ema}} + (1-d)\\,\\theta$ after every optimisation step;
samples are drawn with $\\theta_{\\text{ema}}$ swapped in (Ho et al. 2020 use $d = 0.9999$).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, module_names: list[str], decay: float, start: int = 0):
        missing = [name for name in module_names if not isinstance(getattr(model, name, None), nn.Module)]
        if missing:
            raise ValueError(f"ema_modules() names {missing}, which are not submodules of {type(model).__name__}")
        self.decay = decay
        self.start = start
        # Floating-point parameters and buffers of the chosen submodules, by their full names.
        self.shadow: dict[str, torch.Tensor] = {
            name: tensor.detach().clone()
            for name, tensor in _tracked(model, module_names)
        }
        self.module_names = list(module_names)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Call after the optimiser step number ``step`` (1-based)."""
        live = dict(_tracked(model, self.module_names))
        for name, shadow in self.shadow.items():
            if step <= self.start:
                shadow.copy_(live[name])
            else:
                shadow.lerp_(live[name], 1.0 - self.decay)  # d * shadow + (1 - d) * theta

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise ValueError("EMA state does not match the model's tracked weights")
        for name, tensor in state.items():
            self.shadow[name].copy_(tensor)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Swap the EMA weights into ``model`` for the duration of the block."""
        live = dict(_tracked(model, self.module_names))
        backup = {name: live[name].detach().clone() for name in self.shadow}
        self.copy_weights(self.shadow, model)
        try:
            yield
        finally:
            self.copy_weights(backup, model)

    @staticmethod
    @torch.no_grad()
    def copy_weights(weights: dict[str, torch.Tensor], model: nn.Module) -> None:
        live = dict(model.named_parameters())
        live.update(model.named_buffers())
        unknown = [name for name in weights if name not in live]
        if unknown:
            raise ValueError(f"EMA weights name tensors the model does not have: {unknown[:3]}")
        for name, tensor in weights.items():
            live[name].copy_(tensor)


def _tracked(model: nn.Module, module_names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for module_name in module_names:
        module = getattr(model, module_name)
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if tensor.is_floating_point():
                yield f"{module_name}.{name}", tensor
