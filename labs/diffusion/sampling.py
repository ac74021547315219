r"""Samplers: short loops over the scheduler's update rule, and classifier-free guidance.

A sampler is one shared loop (``sample_loop``) around its own update rule (``SAMPLER_STEPS``). It starts
from $x_T \sim \mathcal N(0, I)$ and calls a ``denoise(xt, t)`` function (the network, with guidance
already applied) once per step. All randomness comes from the
``generator`` passed in, so the same seed gives the same images and sampling never touches
the global RNG that training uses.

Guidance convention (this is diffusers' ``guidance_scale``, same number, same meaning):

$\tilde\epsilon = \epsilon_\theta(x_t, \varnothing) + w\,\big(\epsilon_\theta(x_t, c) - \epsilon_\theta(x_t, \varnothing)\big)$

so $w = 1$ is the plain conditional model, $w = 0$ the unconditional one, and $w > 1$
extrapolates away from the unconditional prediction. Ho & Salimans 2022 (eq. 6) write
$(1 + w')\,\epsilon_\theta(x_t, c) - w'\,\epsilon_\theta(x_t, \varnothing)$: their $w'$ is our $w - 1$.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .scheduler import NoiseScheduler, SchedulerStep

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (xt (B,C,H,W), t (B,)) -> model output


@dataclass
class SamplerOutput:
    """What a sampling loop returns."""

    images: torch.Tensor  # x_0, (B, C, H, W), clamped to [-1, 1]
    timesteps: torch.Tensor  # the noise levels visited, (steps,)
    nfe: int  # network evaluations per image (x2 with guidance)
    intermediates: list[torch.Tensor] = field(default_factory=list)  # x_T, then x_t after each step (on CPU)
    pred_x0: list[torch.Tensor] = field(default_factory=list)  # \hat x_0 at each step (on CPU)


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance: float) -> torch.Tensor:
    r"""$\tilde\epsilon = \epsilon_\varnothing + w\,(\epsilon_c - \epsilon_\varnothing)$ (Ho & Salimans eq. 6 with $w = 1 + w'$).

    Linear in the prediction, so it applies unchanged to v-predictions."""
    return eps_uncond + guidance * (eps_cond - eps_uncond)


def _start(shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    r"""$x_T \sim \mathcal N(0, I)$, drawn on the generator's device (same seed, same noise on CPU and GPU)."""
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def _ddpm_step(scheduler: NoiseScheduler, model_output: torch.Tensor, t: int, xt: torch.Tensor, prev_t: int,
               generator: torch.Generator, eta: float) -> SchedulerStep:
    """Ancestral: x_{t-1} ~ p(x_{t-1} | x_t) (``eta`` is DDIM's and is not used here)."""
    return scheduler.ddpm_step(model_output, t, xt, prev_t, generator=generator)


def _ddim_step(scheduler: NoiseScheduler, model_output: torch.Tensor, t: int, xt: torch.Tensor, prev_t: int,
               generator: torch.Generator, eta: float) -> SchedulerStep:
    """DDIM: x_t -> x_{t_prev}, deterministic for ``eta = 0``."""
    return scheduler.ddim_step(model_output, t, xt, prev_t, eta=eta, generator=generator)


# The update rule each sampler applies once per level; the loop around it is shared (``sample_loop``).
SAMPLER_STEPS: dict[str, Callable[..., SchedulerStep]] = {"ddpm": _ddpm_step, "ddim": _ddim_step}


def sample_loop(denoise: Denoiser, scheduler: NoiseScheduler, shape: tuple[int, ...], steps: int,
                generator: torch.Generator, device: torch.device | str = "cpu", sampler: str = "ddim",
                eta: float = 0.0, return_intermediates: bool = False, nfe_per_step: int = 1,
                callback: Callable[[int, SchedulerStep], None] | None = None) -> SamplerOutput:
    """The one sampling loop: from x_T, call ``denoise`` and the named sampler's step at each of ``steps`` levels
    (and ``callback(i, step)`` after the i-th, 1-based: live previews; it draws nothing from ``generator``)."""
    if sampler not in SAMPLER_STEPS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLER_STEPS)}, got {sampler!r}")
    step_fn = SAMPLER_STEPS[sampler]
    timesteps = scheduler.inference_timesteps(steps)  # (steps,), T-1 ... 0
    levels = timesteps.tolist() + [-1]  # -1: the clean image, after the last step
    xt = _start(shape, generator, device)  # x_T
    intermediates, pred_x0s = [xt.cpu()] if return_intermediates else [], []
    for i, (t, prev_t) in enumerate(zip(levels[:-1], levels[1:]), start=1):
        model_output = denoise(xt, torch.full((shape[0],), t, device=xt.device, dtype=torch.long))
        step = step_fn(scheduler, model_output, t, xt, prev_t, generator, eta)
        xt = step.prev_sample
        if callback is not None:
            callback(i, step)
        if return_intermediates:
            intermediates.append(xt.cpu())
            pred_x0s.append(step.pred_x0.cpu())
    clip = scheduler.cfg.clip_range
    final = xt.clamp(-clip, clip) if scheduler.cfg.clip_x0 else xt  # latents (clip_x0 false) are not bounded
    return SamplerOutput(images=final, timesteps=timesteps, nfe=steps * nfe_per_step,
                         intermediates=intermediates, pred_x0=pred_x0s)


def ddpm_sample(denoise: Denoiser, scheduler: NoiseScheduler, shape: tuple[int, ...], steps: int,
                generator: torch.Generator, device: torch.device | str = "cpu",
                return_intermediates: bool = False, nfe_per_step: int = 1) -> SamplerOutput:
    """Ancestral sampling (Ho et al. Algorithm 2); ``steps = T`` is the paper's sampler, fewer skip levels."""
    return sample_loop(denoise, scheduler, shape, steps, generator, device, sampler="ddpm",
                       return_intermediates=return_intermediates, nfe_per_step=nfe_per_step)


def ddim_sample(denoise: Denoiser, scheduler: NoiseScheduler, shape: tuple[int, ...], steps: int,
                generator: torch.Generator, device: torch.device | str = "cpu", eta: float = 0.0,
                return_intermediates: bool = False, nfe_per_step: int = 1) -> SamplerOutput:
    """DDIM (Song et al. eq. 12) over ``steps`` evenly spaced levels; ``eta = 0`` is deterministic given x_T."""
    return sample_loop(denoise, scheduler, shape, steps, generator, device, sampler="ddim", eta=eta,
                       return_intermediates=return_intermediates, nfe_per_step=nfe_per_step)


SAMPLERS = {"ddpm": ddpm_sample, "ddim": ddim_sample}
