r"""Checks for the rectified-flow exercise (notebook 03, section 5).

The reference is the lab's own code (``labs.flow``), so the exercise checks the student against exactly what
``FlowLab`` trains with (and that code raises while the student's runs, so an answer cannot just call it):

- :func:`check_flow_matching_loss`: the flow-matching loss for given times and noise,
  $\frac1B\sum_b \frac1P\lVert v_\theta\big((1 - t_b)\,x_{0,b} + t_b\,\epsilon_b,\ t_b,\ c_b\big)
  - (\epsilon_b - x_{0,b})\rVert^2$ (Liu et al. 2022 eq. 1; Lipman et al. 2023 eq. 23; Esser et al. 2024 eq. 2-3).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lab_utils.core.exercises.cases import Case, Hint
from lab_utils.core.exercises.checks import CheckResult, check_function
from lab_utils.core.exercises.records import case_seed, graded, seeded_module

from .lab import FlowLab, flow_matching_loss
from .path import add_noise, velocity


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


class _ToyVelocityModel(nn.Module):
    r"""A stand-in for $v_\theta(x_t, t, c)$, small enough for a check, whose output depends on all three: a 3x3
    convolution of x_t plus, per channel, a linear function of the time t in [0, 1] and a linear map of the
    condition c (B, D)."""

    def __init__(self, channels: int = 3, cond_dim: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.time = nn.Linear(1, channels)
        self.cond = nn.Linear(cond_dim, channels)

    def forward(self, xt: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        per_channel = self.time(t.view(-1, 1).to(xt.dtype)) + self.cond(cond)  # (B, C)
        return self.conv(xt) + 3 * per_channel[:, :, None, None]  # (B, C, H, W)


def _toy_velocity_model(seed: int) -> _ToyVelocityModel:
    """A toy v_theta with weights drawn from ``seed`` (the caller's random stream is left alone)."""
    return seeded_module(_ToyVelocityModel, seed)


@graded("flow_matching_loss")
def check_flow_matching_loss(loss_fn: Callable) -> CheckResult:
    r"""``loss_fn(v_model, x0, t, eps, cond) -> loss``: the straight path $x_t = (1 - t)\,x_0 + t\,\epsilon$, the
    network's velocity ``v_model(xt, t, cond)`` and the mean over every element of $(v_\theta - (\epsilon - x_0))^2$:
    a 0-dim tensor that gradients flow through.

    x0, eps: (B, C, H, W); t: (B,) float32 in [0, 1] (0 = data, 1 = noise). Compared with the lab's
    ``flow_matching_loss``, which may not be called (nor ``labs.flow``'s ``add_noise`` and ``velocity``)."""
    gen = torch.Generator().manual_seed(case_seed(10))
    cases = []
    for seed, t in enumerate(([0.0, 0.25, 0.5, 1.0], None, [0.9, 0.1])):
        B = 4 if t is None else len(t)
        times = torch.rand(B, generator=gen) if t is None else torch.tensor(t)
        label = "the ends and the middle" if seed == 0 else ("random times" if t is None else "a batch of two")
        shown = ", ".join(f"{value:.2f}" for value in times.tolist())
        cases.append(Case((_toy_velocity_model(seed), _randn(gen, B, 3, 8, 8).clamp(-1, 1), times,
                           _randn(gen, B, 3, 8, 8), _randn(gen, B, 4)), label=f"{label}, t = [{shown}]"))

    def straight(x0, t, eps):
        t = t.view(-1, 1, 1, 1)
        return (1 - t) * x0 + t * eps

    def reversed_path(v_model, x0, t, eps, cond):
        t4 = t.view(-1, 1, 1, 1)
        return (v_model(t4 * x0 + (1 - t4) * eps, t, cond) - (eps - x0)).pow(2).mean()

    def backwards_velocity(v_model, x0, t, eps, cond):
        return (v_model(straight(x0, t, eps), t, cond) - (x0 - eps)).pow(2).mean()

    def eps_target(v_model, x0, t, eps, cond):
        return (v_model(straight(x0, t, eps), t, cond) - eps).pow(2).mean()

    def x0_target(v_model, x0, t, eps, cond):
        return (v_model(straight(x0, t, eps), t, cond) - x0).pow(2).mean()

    def ddpm_path(v_model, x0, t, eps, cond):
        t4 = t.view(-1, 1, 1, 1)
        return (v_model((1 - t4).sqrt() * x0 + t4.sqrt() * eps, t, cond) - (eps - x0)).pow(2).mean()

    def clean_input(v_model, x0, t, eps, cond):
        return (v_model(x0, t, cond) - (eps - x0)).pow(2).mean()

    def summed(v_model, x0, t, eps, cond):
        return (v_model(straight(x0, t, eps), t, cond) - (eps - x0)).pow(2).sum(dim=(1, 2, 3)).mean()

    return check_function(
        loss_fn, flow_matching_loss, cases, name="flow_matching_loss", atol=1e-5,
        hint=Hint("the DDPM loss with a straight line in place of the curve: mix x0 and eps linearly by t (t = 0 is "
                  "the image, t = 1 the noise), ask the network for its velocity there, and score it by the squared "
                  "error against the velocity of that line, averaged",
                  "t is (B,): give it three trailing dimensions of size 1 so that x_t = (1 - t) x0 + t eps is mixed "
                  "image by image; the line's velocity d x_t / dt is eps - x0, the same at every t; the network is "
                  "called as v_model(x_t, t, cond) with t as it is; the loss is the mean over every element of the "
                  "squared difference, kept as a tensor"),
        forbid=(flow_matching_loss, add_noise, velocity, (FlowLab, "loss")),
        known_mistakes=[(reversed_path, "the path runs the other way: t = 0 is the data and t = 1 the noise, so "
                                        "x_t = (1 - t) x0 + t eps"),
                        (backwards_velocity, "the velocity is d x_t / dt = eps - x0: along t the path goes from the "
                                             "data towards the noise"),
                        (eps_target, "the target is the velocity eps - x0, not the noise eps (that was the DDPM's)"),
                        (x0_target, "the target is the velocity eps - x0, not the clean image x0"),
                        (ddpm_path, "no square roots here: the straight path mixes x0 and eps with weights 1 - t and "
                                    "t, which add up to 1"),
                        (clean_input, "the network must see the point x_t on the path, not the clean x0"),
                        (summed, "average over every element, pixels too (a plain mean, as F.mse_loss does), not a "
                                 "sum per image")])
