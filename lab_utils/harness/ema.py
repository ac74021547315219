"""Exponential moving average of chosen submodules' weights.

$\\theta_{\\text{ema}} \\leftarrow d\\,\\theta_{\\text{ema}} + (1-d)\\,\\theta$ after every optimisation step;
samples are drawn with $\\theta_{\\text{ema}}$ swapped in (Ho et al. 2020 use $d = 0.9999$).

With ``warmup`` the decay of update $t$ (counted from 0 at the first averaging update) is
$d_t = \\min\\big(d, \\frac{1 + t}{10 + t}\\big)$, the ``num_updates`` warm-up of TensorFlow's
``ExponentialMovingAverage`` (also diffusers' ``EMAModel``): 0.1 at $t = 0$, 0.5 at $t = 8$, 0.99 at
$t = 890$. Without it a 0.9999 average is still $0.9999^{2000} = 82\\%$ the initial weights at step 2000.

The update is one fused call over all tracked tensors (``torch._foreach_lerp_``), not a Python loop of
one kernel per tensor: the shadow tensors and the live tensors they follow sit in two aligned lists.
The decay is a Python float (from the Python step count), so the update reads nothing from the device.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, module_names: list[str], decay: float, start: int = 0,
                 warmup: bool = False):
        missing = [name for name in module_names if not isinstance(getattr(model, name, None), nn.Module)]
        if missing:
            raise ValueError(f"ema_modules() names {missing}, which are not submodules of {type(model).__name__}")
        self.decay = decay  # d, the decay after the warm-up (or always, without one)
        self.start = start  # steps 1..start copy the weights instead of averaging them
        self.warmup = warmup  # d_t = min(d, (1 + t) / (10 + t)); see the module docstring
        # Floating-point parameters and buffers of the chosen submodules, by their full names.
        self.shadow: dict[str, torch.Tensor] = {
            name: tensor.detach().clone()
            for name, tensor in _tracked(model, module_names)
        }
        self.module_names = list(module_names)
        # Aligned lists for the fused update: shadows[i] follows live[i]. The shadow tensors are never
        # replaced (load_state_dict copies into them); the live ones are resolved by name in _bind.
        self._shadows: list[torch.Tensor] = list(self.shadow.values())
        self._bind(model)

    def _bind(self, model: nn.Module) -> None:
        """Resolve, by name, the live tensor of ``model`` that each shadow tensor follows."""
        live = dict(_tracked(model, self.module_names))
        missing = [name for name in self.shadow if name not in live]
        if missing:
            raise ValueError(f"the model has no tensors {missing[:3]}, which the EMA tracks")
        self._model = model
        self._live: list[torch.Tensor] = [live[name] for name in self.shadow]
        # Where each live tensor is registered (its module's _parameters or _buffers dict, and its key):
        # `.to()` replaces buffers (parameters keep their identity), `load_state_dict(assign=True)` and
        # `module.weight = nn.Parameter(...)` replace parameters; _is_bound_to notices all of these.
        self._slots: list[tuple[dict[str, torch.Tensor | None], str]] = []
        for name in self.shadow:
            module_path, _, key = name.rpartition(".")
            owner = model.get_submodule(module_path)
            self._slots.append((owner._parameters if key in owner._parameters else owner._buffers, key))

    def _is_bound_to(self, model: nn.Module) -> bool:
        """Whether the cached live tensors are still ``model``'s: one dict look-up per tensor, no traversal."""
        return model is self._model and all(
            slot.get(key) is tensor for (slot, key), tensor in zip(self._slots, self._live)
        )

    def decay_at(self, step: int) -> float:
        r"""The decay of the update after optimiser step ``step`` (1-based, > ``start``): $d$, or with the
        warm-up $d_t = \min(d, (1 + t) / (10 + t))$ where $t$ = ``step - start - 1`` updates averaged before."""
        if not self.warmup:
            return self.decay
        t = step - self.start - 1  # t = 0 at the first averaging update
        return min(self.decay, (1.0 + t) / (10.0 + t))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Call after the optimiser step number ``step`` (1-based)."""
        if not self._is_bound_to(model):
            self._bind(model)
        if step <= self.start:
            torch._foreach_copy_(self._shadows, self._live)
        else:  # shadow <- d_t * shadow + (1 - d_t) * theta, every tracked tensor in one call
            torch._foreach_lerp_(self._shadows, self._live, 1.0 - self.decay_at(step))

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
