r"""The straight probability path of rectified flow: no network, no parameters, only the mathematics.

A sample of the data $x_0$ and a sample of the noise $\epsilon \sim \mathcal N(0, I)$ are joined by a straight
line (Liu et al. 2022, "Flow Straight and Fast", eq. 1; Lipman et al. 2023, "Flow Matching", the conditional
OT path with $\sigma_\text{min} = 0$; Esser et al. 2024, "Scaling Rectified Flow Transformers" (Stable
Diffusion 3), eq. 2 and sec. 3.1):

$x_t = (1 - t)\,x_0 + t\,\epsilon$, $t \in [0, 1]$ ($t = 0$ the data, $t = 1$ pure noise),

travelled at the constant velocity $\frac{d x_t}{dt} = \epsilon - x_0 = v$. A network $v_\theta(x_t, t, c)$
regresses $v$; its minimiser is $\mathbb E[\epsilon - x_0 \mid x_t]$, the velocity field whose ODE
$\frac{dx}{dt} = v_\theta$ carries the noise at $t = 1$ to the data at $t = 0$. Given a velocity, the clean
end of the straight line through $x_t$ is $\hat x_0 = x_t - t\,v$.

Training draws $t$ from a logit-normal (SD3 sec. 3.1: $t = \sigma(n)$, $n \sim \mathcal N(m, s^2)$, more draws
in the middle of the path, where the velocity is hardest to predict) or uniformly, then optionally shifts it
towards the noise: $t' = \frac{\alpha t}{1 + (\alpha - 1) t}$ (SD3 eq. 23 with $\alpha$ = ``time_shift``; 1 =
no shift). The sampler's time grid is shifted the same way.
"""

from __future__ import annotations

import torch


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    r"""$x_t = (1 - t)\,x_0 + t\,\epsilon$ (Liu et al. eq. 1). x0, eps: (B, C, H, W); t: (B,) in [0, 1]."""
    t = t.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))  # (B, 1, 1, 1)
    return (1 - t) * x0 + t * eps


def velocity(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    r"""$v = \frac{d x_t}{dt} = \epsilon - x_0$: the regression target, the same at every t of one line."""
    return eps - x0


def pred_x0(xt: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    r"""$\hat x_0 = x_t - t\,v$: the data end of the straight line through $x_t$ with velocity $v$."""
    if isinstance(t, torch.Tensor):
        t = t.to(xt.dtype).view(-1, *([1] * (xt.dim() - 1)))  # (B, 1, 1, 1)
    return xt - t * v


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    r"""$t' = \frac{\alpha t}{1 + (\alpha - 1)\,t}$ (Esser et al. eq. 23, $\alpha$ = ``shift``): more time near the
    noise for $\alpha > 1$; fixes 0 and 1; $\alpha = 1$ is the identity."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def sample_times(batch: int, distribution: str, logit_mean: float = 0.0, logit_std: float = 1.0,
                 shift: float = 1.0, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Training times, (batch,) float32 in [0, 1]: ``logit_normal`` $t = \sigma(n)$, $n \sim \mathcal N(m, s^2)$
    (Esser et al. sec. 3.1, eq. 19), or ``uniform`` $t \sim U(0, 1)$; then shifted (:func:`shift_time`).
    Drawn on ``device`` from ``generator`` (on that device; the global RNG if None, which the trainer seeds and
    checkpoints), so a training step copies nothing from the host."""
    if distribution == "logit_normal":
        n = logit_mean + logit_std * torch.randn(batch, generator=generator, device=device)  # n ~ N(m, s^2)
        t = torch.sigmoid(n)  # t = 1 / (1 + e^{-n})
    elif distribution == "uniform":
        t = torch.rand(batch, generator=generator, device=device)  # t ~ U(0, 1)
    else:
        raise ValueError(f"time distribution must be 'logit_normal' or 'uniform', got {distribution!r}")
    return shift_time(t, shift)


def time_grid(steps: int, shift: float = 1.0) -> list[float]:
    r"""The ``steps + 1`` times a sampler visits, from 1 (noise) down to 0 (data): $t_i = i / N$, shifted
    (:func:`shift_time`), so the end points stay exactly 1 and 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    grid = shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)  # (steps + 1,)
    times = grid.tolist()
    times[0], times[-1] = 1.0, 0.0
    return times
