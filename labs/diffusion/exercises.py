"""Checks for the diffusion exercises (notebooks 03 and 04).

Every reference is the lab's own code (``labs.diffusion``), so an exercise checks the student
against exactly what the trained model uses:

- notebook 03: :func:`check_add_noise`, :func:`check_ddpm_step`, :func:`check_ddim_step`;
- notebook 04: :func:`check_attention_weights`, :func:`check_cross_attention`, :func:`check_guidance`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from labs.diffusion import CrossAttention, NoiseScheduler, SchedulerConfig, attention, classifier_free_guidance
from labs.text_encoder import TextEncoding

from lab_utils.exercises import Case, check_function, check_module


def _scheduler(schedule: str = "linear", T: int = 1000) -> NoiseScheduler:
    """A scheduler without x0 clipping, so the exercises' plain formulas are exact."""
    return NoiseScheduler(SchedulerConfig(num_train_timesteps=T, beta_schedule=schedule, clip_x0=False))


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


# ---------------------------------------------------------------------------------- add_noise
def check_add_noise(add_noise: Callable) -> bool:
    r"""``add_noise(x0, eps, t, alpha_bar) -> xt``: $x_t = \sqrt{\bar\alpha_t}x_0 + \sqrt{1-\bar\alpha_t}\epsilon$.

    x0, eps: (B, C, H, W); t: (B,) long; alpha_bar: (T,) the schedule's cumulative products."""
    gen = torch.Generator().manual_seed(0)
    cases = []
    for schedule, t in (("linear", [0, 10, 500, 999]), ("cosine", [999, 3, 250, 700]), ("linear", [42, 42, 42, 42])):
        scheduler = _scheduler(schedule)
        x0 = _randn(gen, 4, 3, 8, 8).clamp(-1, 1)
        cases.append(Case((x0, _randn(gen, 4, 3, 8, 8), torch.tensor(t), scheduler.alpha_bar.float()),
                          label=f"{schedule} schedule, t = {t}"))

    def reference(x0, eps, t, alpha_bar):
        return _with_alpha_bar(alpha_bar).add_noise(x0, eps, t)

    def no_sqrt(x0, eps, t, alpha_bar):
        a = alpha_bar[t].view(-1, 1, 1, 1)
        return a * x0 + (1 - a) * eps

    def alpha_not_bar(x0, eps, t, alpha_bar):
        return reference(x0, eps, t, alpha_bar / torch.cat([torch.ones(1), alpha_bar[:-1]]))

    return check_function(
        add_noise, reference, cases, name="add_noise", atol=1e-5,
        hint="take alpha_bar[t], reshape it to (B, 1, 1, 1) so it broadcasts over (C, H, W), and use "
             "square roots: sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * eps",
        known_mistakes=[(no_sqrt, "the mean and the std need square roots: the *variances* are "
                                  "alpha_bar_t and 1 - alpha_bar_t"),
                        (alpha_not_bar, "use the cumulative product alpha_bar_t, not the single-step alpha_t")])


def _with_alpha_bar(alpha_bar: torch.Tensor) -> NoiseScheduler:
    """A scheduler whose alpha_bar is the given (T,) tensor (for checking functions that take alpha_bar)."""
    scheduler = _scheduler(T=len(alpha_bar))
    scheduler.alpha_bar = alpha_bar.double()
    return scheduler


# ---------------------------------------------------------------------------------- DDPM step
def check_ddpm_step(ddpm_step: Callable) -> bool:
    r"""``ddpm_step(xt, eps, t, betas, alpha_bar, z) -> x_{t-1}`` (Ho et al. eq. 11, Algorithm 2):

    $x_{t-1} = \frac{1}{\sqrt{\alpha_t}}\big(x_t - \frac{\beta_t}{\sqrt{1-\bar\alpha_t}}\epsilon\big) + \sigma_t z$,
    $\sigma_t^2 = \tilde\beta_t = \frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\beta_t$, and no noise at t = 0.
    t: an int; betas, alpha_bar: (T,) float64; z: standard normal noise like xt."""
    gen = torch.Generator().manual_seed(1)
    cases = []
    for schedule, t in (("linear", 999), ("linear", 500), ("cosine", 250), ("cosine", 1), ("linear", 0)):
        scheduler = _scheduler(schedule)
        cases.append(Case((_randn(gen, 2, 3, 8, 8), _randn(gen, 2, 3, 8, 8), t, scheduler.betas,
                           scheduler.alpha_bar, _randn(gen, 2, 3, 8, 8)), label=f"{schedule} schedule, t = {t}"))

    def reference(xt, eps, t, betas, alpha_bar, z):
        scheduler = _scheduler(T=len(betas))
        scheduler.betas, scheduler.alpha_bar = betas, alpha_bar
        scheduler.alpha_bar_prev = torch.cat([torch.ones(1, dtype=alpha_bar.dtype), alpha_bar[:-1]])
        mean, variance = scheduler.posterior_mean_variance(scheduler.x0_from_eps(xt, eps, t), xt, t)
        return mean if t == 0 else mean + variance.sqrt() * z

    def noise_at_zero(xt, eps, t, betas, alpha_bar, z):
        if t > 0:
            return reference(xt, eps, t, betas, alpha_bar, z)
        return reference(xt, eps, t, betas, alpha_bar, z) + (betas[0] ** 0.5).item() * z

    def large_variance(xt, eps, t, betas, alpha_bar, z):
        out = reference(xt, eps, t, betas, alpha_bar, torch.zeros_like(z))
        return out if t == 0 else out + betas[t].sqrt().item() * z

    return check_function(
        ddpm_step, reference, cases, name="ddpm_step", atol=1e-4,
        hint="mean = (xt - beta_t / sqrt(1 - alpha_bar_t) * eps) / sqrt(alpha_t) with alpha_t = 1 - beta_t; "
             "sigma_t^2 = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t; add sigma_t * z only when t > 0",
        known_mistakes=[(noise_at_zero, "the last step (t = 0) adds no noise: return the mean"),
                        (large_variance, "this exercise uses sigma_t^2 = beta_tilde_t (the posterior variance), "
                                         "not beta_t")])


# ---------------------------------------------------------------------------------- DDIM step
def check_ddim_step(ddim_step: Callable) -> bool:
    r"""``ddim_step(xt, eps, t, prev_t, alpha_bar) -> x_{prev_t}``, deterministic DDIM (eta = 0), Song et al. eq. 12:

    $\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\epsilon)/\sqrt{\bar\alpha_t}$,
    $x_{s} = \sqrt{\bar\alpha_s}\hat x_0 + \sqrt{1-\bar\alpha_s}\,\epsilon$, with $\bar\alpha_{-1} = 1$ (prev_t = -1)."""
    gen = torch.Generator().manual_seed(2)
    cases = []
    for schedule, t, prev_t in (("linear", 999, 979), ("cosine", 999, 499), ("cosine", 500, 480),
                                ("linear", 20, 0), ("linear", 20, -1)):
        scheduler = _scheduler(schedule)
        cases.append(Case((_randn(gen, 2, 3, 8, 8), _randn(gen, 2, 3, 8, 8), t, prev_t, scheduler.alpha_bar),
                          label=f"{schedule} schedule, t = {t} -> {prev_t}"))

    def reference(xt, eps, t, prev_t, alpha_bar):
        return _with_alpha_bar(alpha_bar).ddim_step(eps, t, xt, prev_t, eta=0.0).prev_sample

    def prev_minus_one_wrong(xt, eps, t, prev_t, alpha_bar):
        return reference(xt, eps, t, max(prev_t, 0), alpha_bar)

    def python_negative_index(xt, eps, t, prev_t, alpha_bar):
        return reference(xt, eps, t, prev_t % len(alpha_bar), alpha_bar)

    return check_function(
        ddim_step, reference, cases, name="ddim_step", atol=1e-4,
        hint="first x0_hat = (xt - sqrt(1 - alpha_bar_t) * eps) / sqrt(alpha_bar_t), then "
             "sqrt(alpha_bar_prev) * x0_hat + sqrt(1 - alpha_bar_prev) * eps",
        known_mistakes=[(prev_minus_one_wrong, "prev_t = -1 means 'no noise left': alpha_bar_prev = 1, "
                                               "not alpha_bar[0]"),
                        (python_negative_index, "alpha_bar[-1] is Python's *last* entry (pure noise); prev_t = -1 "
                                                "means 'no noise left', alpha_bar_prev = 1")])


# ---------------------------------------------------------------------------------- guidance
def check_guidance(guidance_fn: Callable) -> bool:
    r"""``guidance_fn(eps_uncond, eps_cond, w) -> eps``: $\epsilon_\varnothing + w(\epsilon_c - \epsilon_\varnothing)$."""
    gen = torch.Generator().manual_seed(3)
    cases = [Case((_randn(gen, 2, 3, 4, 4), _randn(gen, 2, 3, 4, 4), w), label=f"w = {w}")
             for w in (1.0, 0.0, 3.0, 7.5)]

    def ho_salimans(eps_uncond, eps_cond, w):
        return (1 + w) * eps_cond - w * eps_uncond

    def swapped(eps_uncond, eps_cond, w):
        return eps_cond + w * (eps_uncond - eps_cond)

    return check_function(
        guidance_fn, classifier_free_guidance, cases, name="classifier_free_guidance",
        hint="start from the unconditional prediction and move w times along (cond - uncond); "
             "w = 1 must give eps_cond exactly",
        known_mistakes=[(ho_salimans, "that is Ho & Salimans' convention (1 + w) cond - w uncond; the lab uses "
                                      "diffusers' guidance_scale, where w = 1 means 'no guidance'"),
                        (swapped, "uncond and cond are swapped: guidance moves *away* from the unconditional "
                                  "prediction")])


# ---------------------------------------------------------------------------------- attention
def check_attention_weights(weights_fn: Callable) -> bool:
    r"""``weights_fn(q, k, mask) -> softmax(q k^T / sqrt(d_k))`` with masked keys at weight 0.

    q: (B, nh, Tq, d), k: (B, nh, Tk, d), mask: (B, 1, 1, Tk) bool, True = real token."""
    gen = torch.Generator().manual_seed(4)
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])[:, None, None, :]
    cases = [
        Case((_randn(gen, 2, 2, 6, 8), _randn(gen, 2, 2, 5, 8), mask), label="padded prompt in the batch"),
        Case((3 * _randn(gen, 2, 4, 16, 4), 3 * _randn(gen, 2, 4, 5, 4), mask), label="16 image positions, 4 heads"),
    ]

    def reference(q, k, mask):
        return attention(q, k, torch.zeros_like(k), mask, return_weights=True)[1]

    def no_scale(q, k, mask):
        return reference(q * q.size(-1) ** 0.5, k, mask)

    def no_mask(q, k, mask):
        return reference(q, k, None)

    return check_function(
        weights_fn, reference, cases, name="attention_weights",
        hint="scores = q @ k.transpose(-2, -1) / sqrt(d); scores.masked_fill(~mask, -inf); softmax over the last dim",
        known_mistakes=[(no_scale, "divide the scores by sqrt(d_k) before the softmax"),
                        (no_mask, "padding keys must get weight 0: fill their scores with -inf before the softmax")])


def _reference_cross_attention(channels: int, cond_dim: int, heads: int, groups: int) -> nn.Module:
    """The lab's CrossAttention with its zero-initialised output projection made random (else it is the identity)."""
    layer = CrossAttention(channels, cond_dim, heads, groups)
    nn.init.normal_(layer.proj.weight, std=channels**-0.5)
    nn.init.normal_(layer.norm.weight, mean=1.0, std=0.1)
    return layer


def check_cross_attention(cross_attention_cls: Callable[..., nn.Module]) -> bool:
    """A ``CrossAttention(channels, cond_dim, heads, groups)`` layer with submodules ``norm``
    (GroupNorm), ``to_q`` (Linear C->C), ``to_kv`` (Linear D->2C), ``proj`` (Linear C->C), whose
    ``forward(x, context)`` returns ``x + proj(attention)`` for x (B, C, H, W) and a TextEncoding ``context``."""
    gen = torch.Generator().manual_seed(5)
    B, C, D, L = 2, 16, 12, 5
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])

    def context() -> TextEncoding:
        tokens = _randn(gen, B, L, D)
        return TextEncoding(tokens=tokens, mask=mask, pooled=tokens.mean(1))

    cases = [Case((_randn(gen, B, C, 4, 4), context()), label="4x4 image, a padded prompt"),
             Case((_randn(gen, B, C, 8, 6), context()), label="8x6 image")]
    return check_module(
        cross_attention_cls, _reference_cross_attention, Case((C, D, 4, 4)), cases, name="CrossAttention",
        atol=1e-4,
        hint="q from GroupNorm(x) flattened to (B, HW, C); k, v = to_kv(context.tokens).split(C, -1); split heads to "
             "(B, nh, T, C/nh); mask = context.mask[:, None, None, :]; merge heads; return x + proj(y) reshaped to "
             "(B, C, H, W)")
