r"""The flow's samplers: ODE steps from t = 1 (noise) to t = 0 (data), run by the diffusion lab's one loop.

Sampling integrates $\frac{dx}{dt} = v_\theta(x_t, t, c)$ backwards in time over the grid $1 = t_0 > t_1 > \dots
> t_N = 0$ (``path.time_grid``). Each rule below is a *step* of ``labs.diffusion.sampling.sample_levels``
(``step(denoise, xt, t, prev_t, generator) -> SchedulerStep``): the loop around them, its callback, its
intermediates and its count of network evaluations, is the DDPM's own. Both rules are deterministic: the
only randomness of a flow sample is $x_1 \sim \mathcal N(0, I)$.

- **Euler** (Liu et al. 2022, sec. 2.1): $x_{t_{i+1}} = x_{t_i} + (t_{i+1} - t_i)\,v_\theta(x_{t_i}, t_i)$,
  one evaluation per step, error $O(1/N)$.
- **Heun** (2nd order; Karras et al. 2022, "Elucidating the Design Space", Algorithm 1): an Euler predictor
  $\tilde x = x_{t_i} + h\,v_i$, then the average of the velocities at both ends,
  $x_{t_{i+1}} = x_{t_i} + \frac h2\,\big(v_i + v_\theta(\tilde x, t_{i+1})\big)$, $h = t_{i+1} - t_i$:
  two evaluations per step, error $O(1/N^2)$. The last step, to $t = 0$, is plain Euler, as in Karras et al.
  (so $2N - 1$ evaluations in all).

Each step also returns $\hat x_0 = x_{t_i} - t_i\,v_i$ (``path.pred_x0``) for live previews.
"""

from __future__ import annotations

import torch

from labs.diffusion.sampling import LevelDenoiser, Step
from labs.diffusion.scheduler import SchedulerStep

from .path import pred_x0


def euler_step(denoise: LevelDenoiser, xt: torch.Tensor, t: float, prev_t: float,
               generator: torch.Generator | None = None) -> SchedulerStep:
    r"""Euler: $x_{t_\text{prev}} = x_t + (t_\text{prev} - t)\,v_\theta(x_t, t)$ (deterministic: ``generator`` unused)."""
    v = denoise(xt, t)  # v_theta(x_t, t), (B, C, H, W)
    return SchedulerStep(prev_sample=xt + (prev_t - t) * v, pred_x0=pred_x0(xt, v, t))


def heun_step(denoise: LevelDenoiser, xt: torch.Tensor, t: float, prev_t: float,
              generator: torch.Generator | None = None) -> SchedulerStep:
    r"""Heun: Euler predictor $\tilde x = x_t + h\,v_t$, then the corrector
    $x_{t_\text{prev}} = x_t + \frac h2 \big(v_t + v_\theta(\tilde x, t_\text{prev})\big)$ with $h = t_\text{prev} - t$;
    at $t_\text{prev} = 0$ the Euler step alone (Karras et al. Algorithm 1). Deterministic: ``generator`` unused."""
    h = prev_t - t  # < 0: backwards in time
    v = denoise(xt, t)  # v_theta(x_t, t)
    euler = xt + h * v  # predictor \tilde x at t_prev
    if prev_t == 0:
        return SchedulerStep(prev_sample=euler, pred_x0=pred_x0(xt, v, t))
    v_prev = denoise(euler, prev_t)  # v_theta(\tilde x, t_prev)
    return SchedulerStep(prev_sample=xt + 0.5 * h * (v + v_prev), pred_x0=pred_x0(xt, v, t))


# sampler name -> its step; ``evaluations(sampler, steps)`` says what each costs
SAMPLER_STEPS: dict[str, Step] = {"euler": euler_step, "heun": heun_step}


def evaluations(sampler: str, steps: int) -> int:
    """Calls of the velocity network per image for ``steps`` steps of ``sampler`` (without guidance's doubling):
    Euler ``steps``, Heun ``2 steps - 1`` (its last step is Euler)."""
    if sampler not in SAMPLER_STEPS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLER_STEPS)}, got {sampler!r}")
    return 2 * steps - 1 if sampler == "heun" else steps
