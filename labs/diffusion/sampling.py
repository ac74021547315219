r"""Samplers: one loop over a list of levels, an update rule per sampler, and classifier-free guidance.

Every sampler of the lab, DDPM ancestral, DDIM (this lab) and the flow lab's Euler and Heun, is the same loop
(``sample_levels``): start from $x_T \sim \mathcal N(0, I)$ and, for each pair of consecutive levels
$(t, t_\text{prev})$ of a list (integer noise levels $T-1 \dots 0$ here, times $1 \dots 0$ for a flow), call a
*step* ``step(denoise, xt, t, prev_t, generator) -> SchedulerStep``. The step calls ``denoise(xt, t)`` (the
network, with guidance already applied) as often as its rule needs (once for DDPM, DDIM and Euler, twice for
Heun), so the loop counts the network evaluations (NFE) as they happen and keeps the callback, the
intermediates and the final clamp in one place. ``sample_loop`` is that loop with the DDPM scheduler's levels
and steps (``SAMPLER_STEPS``). All randomness comes from the ``generator`` passed in, so the same seed gives
the same images and sampling never touches the global RNG that training uses.

Guidance convention (this is diffusers' ``guidance_scale``, same number, same meaning):

$\tilde\epsilon = \epsilon_\theta(x_t, \varnothing) + w\,\big(\epsilon_\theta(x_t, c) - \epsilon_\theta(x_t, \varnothing)\big)$

so $w = 1$ is the plain conditional model, $w = 0$ the unconditional one, and $w > 1$
extrapolates away from the unconditional prediction. Ho & Salimans 2022 (eq. 6) write
$(1 + w')\,\epsilon_\theta(x_t, c) - w'\,\epsilon_\theta(x_t, \varnothing)$: their $w'$ is our $w - 1$.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from .scheduler import NoiseScheduler, SchedulerStep

Level = Union[int, float]  # a DDPM noise level t in {0 .. T-1} (-1: the clean image), or a flow time in [0, 1]
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (xt (B,C,H,W), t (B,)) -> model output
LevelDenoiser = Callable[[torch.Tensor, Level], torch.Tensor]  # (xt (B,C,H,W), one level for the batch) -> output
# step(denoise, xt, t, prev_t, generator): x_t -> x_{t_prev}, calling denoise as often as the rule needs
Step = Callable[[LevelDenoiser, torch.Tensor, Level, Level, torch.Generator], SchedulerStep]


@dataclass
class SamplerOutput:
    """What a sampling loop returns."""

    images: torch.Tensor  # x_0, (B, C, H, W), clamped to [-1, 1] (unless the loop was told not to: latents)
    timesteps: torch.Tensor  # the levels visited, (steps,): long noise levels (DDPM, DDIM), float times (flow)
    nfe: int  # network evaluations per image (x2 with guidance; Heun: 2 per step but the last)
    intermediates: list[torch.Tensor] = field(default_factory=list)  # x_T, then x_t after each step (on CPU)
    pred_x0: list[torch.Tensor] = field(default_factory=list)  # \hat x_0 at each step (on CPU)


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance: float) -> torch.Tensor:
    r"""$\tilde\epsilon = \epsilon_\varnothing + w\,(\epsilon_c - \epsilon_\varnothing)$ (Ho & Salimans eq. 6 with $w = 1 + w'$).

    Linear in the prediction, so it applies unchanged to v-predictions and to a flow's velocities."""
    return eps_uncond + guidance * (eps_cond - eps_uncond)


def start_noise(shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    r"""$x_T \sim \mathcal N(0, I)$, drawn on the generator's device (same seed, same noise on CPU and GPU)."""
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def sample_levels(denoise: Denoiser, levels: Sequence[Level], xt: torch.Tensor, step: Step,
                  generator: torch.Generator, nfe_per_call: int = 1, clip_range: Optional[float] = 1.0,
                  return_intermediates: bool = False,
                  callback: Callable[[int, SchedulerStep], None] | None = None) -> SamplerOutput:
    """The one sampling loop: from ``xt`` at ``levels[0]``, one ``step`` per consecutive pair of ``levels`` down to
    ``levels[-1]`` (the clean end: -1 for the DDPM, 0 for a flow), so ``len(levels) - 1`` steps.

    ``denoise`` sees the level as a (B,) tensor (long for integer levels, float32 for times); ``nfe_per_call`` is
    the network evaluations one call costs per image (2 with guidance). ``callback(i, step)`` runs after the
    i-th step (1-based: live previews; it draws nothing from ``generator``). The result is clamped to
    ``[-clip_range, clip_range]`` (None: not at all, latents)."""
    if len(levels) < 2:
        raise ValueError(f"levels must hold at least a start and an end, got {list(levels)}")
    B = xt.shape[0]
    calls = 0

    def counted(x: torch.Tensor, t: Level) -> torch.Tensor:
        nonlocal calls
        calls += 1
        dtype = torch.long if isinstance(t, int) else torch.float32
        return denoise(x, torch.full((B,), t, device=x.device, dtype=dtype))  # (B, C, H, W)

    intermediates, pred_x0s = [xt.cpu()] if return_intermediates else [], []
    for i, (t, prev_t) in enumerate(zip(levels[:-1], levels[1:]), start=1):
        out = step(counted, xt, t, prev_t, generator)
        xt = out.prev_sample
        if callback is not None:
            callback(i, out)
        if return_intermediates:
            intermediates.append(xt.cpu())
            pred_x0s.append(out.pred_x0.cpu())
    final = xt if clip_range is None else xt.clamp(-clip_range, clip_range)
    return SamplerOutput(images=final, timesteps=torch.tensor(list(levels[:-1])), nfe=calls * nfe_per_call,
                         intermediates=intermediates, pred_x0=pred_x0s)


# ------------------------------------------------------------------------------------ the DDPM's steps
def _ddpm_step(scheduler: NoiseScheduler, eta: float) -> Step:
    """Ancestral: x_{t-1} ~ p(x_{t-1} | x_t) (``eta`` is DDIM's and is not used here)."""
    def step(denoise: LevelDenoiser, xt: torch.Tensor, t: int, prev_t: int,
             generator: torch.Generator) -> SchedulerStep:
        return scheduler.ddpm_step(denoise(xt, t), t, xt, prev_t, generator=generator)

    return step


def _ddim_step(scheduler: NoiseScheduler, eta: float) -> Step:
    """DDIM: x_t -> x_{t_prev}, deterministic for ``eta = 0``."""
    def step(denoise: LevelDenoiser, xt: torch.Tensor, t: int, prev_t: int,
             generator: torch.Generator) -> SchedulerStep:
        return scheduler.ddim_step(denoise(xt, t), t, xt, prev_t, eta=eta, generator=generator)

    return step


# sampler -> (scheduler, eta) -> its update rule, applied once per level; the loop around it is ``sample_levels``
SAMPLER_STEPS: dict[str, Callable[[NoiseScheduler, float], Step]] = {"ddpm": _ddpm_step, "ddim": _ddim_step}


def sample_loop(denoise: Denoiser, scheduler: NoiseScheduler, shape: tuple[int, ...], steps: int,
                generator: torch.Generator, device: torch.device | str = "cpu", sampler: str = "ddim",
                eta: float = 0.0, return_intermediates: bool = False, nfe_per_step: int = 1,
                callback: Callable[[int, SchedulerStep], None] | None = None) -> SamplerOutput:
    """DDPM or DDIM sampling: ``sample_levels`` over ``steps`` of the scheduler's levels (T-1 ... 0, then -1, the
    clean image) with the named sampler's step, from x_T drawn here. ``nfe_per_step``: network evaluations per
    ``denoise`` call (2 with guidance); ``callback(i, step)`` after the i-th step (1-based: live previews)."""
    if sampler not in SAMPLER_STEPS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLER_STEPS)}, got {sampler!r}")
    timesteps = scheduler.inference_timesteps(steps)  # (steps,), T-1 ... 0
    levels = timesteps.tolist() + [-1]  # -1: the clean image, after the last step
    clip = scheduler.cfg.clip_range if scheduler.cfg.clip_x0 else None  # latents (clip_x0 false) are not bounded
    return sample_levels(denoise, levels, start_noise(shape, generator, device),
                         SAMPLER_STEPS[sampler](scheduler, eta), generator, nfe_per_call=nfe_per_step,
                         clip_range=clip, return_intermediates=return_intermediates, callback=callback)


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
