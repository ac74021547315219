r"""Checks for the latent-diffusion exercises (notebook 06).

Every reference is the lab's own code, so an exercise checks the student against exactly what the trained
pipeline uses (and that code raises while the student's runs, so an answer cannot just call it):

- :func:`check_scale_and_shift`: $(s, m) = (1 / \operatorname{std}(z), \operatorname{mean}(z))$ of a batch of latents;
- :func:`check_encode_to_latents`: images -> $s (\mu_\phi(x) - m)$ with the autoencoder's encoder;
- :func:`check_latent_ddim_step`: one deterministic DDIM step on a latent with the lab's scheduler
  (v-prediction, no clipping: latents are not bounded like pixels).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from labs.diffusion import NoiseScheduler, SchedulerConfig

from lab_utils.core.exercises.cases import Case, Hint
from lab_utils.core.exercises.checks import CheckResult, check_function
from lab_utils.core.exercises.records import case_seed, graded

from .autoencoder import AutoencoderConfig, KLAutoencoder
from .lab import LatentDiffusionLab


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


# ---------------------------------------------------------------------------------- scale factor
@graded("scale_and_shift")
def check_scale_and_shift(scale_and_shift: Callable) -> CheckResult:
    r"""``scale_and_shift(z) -> (s, m)``: two floats, $s = 1 / \operatorname{std}(z)$ and $m = \operatorname{mean}(z)$
    over *every* element of the latents z (N, C, h, w), so that $s (z - m)$ has zero mean and unit variance.
    The lab's ``LatentDiffusionLab.measure_scale_factor`` (the same on encoded images) may not be called."""
    gen = torch.Generator().manual_seed(case_seed(0))
    cases = [Case((_randn(gen, 16, 4, 8, 8) * 0.6 + 0.4,), label="latents of std 0.6, mean 0.4"),
             Case((_randn(gen, 8, 4, 8, 8) * torch.tensor([0.2, 1.0, 2.0, 5.0]).view(1, 4, 1, 1),),
                  label="channels of very different spreads"),
             Case((_randn(gen, 2, 3, 4, 4) * 3.0 - 1.0,), label="a small batch")]

    def scale_and_shift_reference(z):
        return 1.0 / z.float().std().item(), z.float().mean().item()

    def as_pair(fn):
        return lambda z: torch.tensor([float(v) for v in fn(z)])

    reference = as_pair(scale_and_shift_reference)

    def per_channel(z):
        return torch.tensor([1.0 / z.std(dim=(0, 2, 3)).mean().item(), z.mean().item()])

    def std_not_inverse(z):
        return torch.tensor([z.std().item(), z.mean().item()])

    return check_function(
        as_pair(scale_and_shift), reference, cases, name="scale_and_shift", atol=1e-4,
        hint=Hint("one scale and one shift for the whole batch: m moves the latents' centre to 0 and s makes their "
                  "spread 1, both measured over every element at once (batch, channels and positions together)",
                  "treat all the numbers in z as one sample: m is their mean, s the reciprocal of their standard "
                  "deviation; return the two as plain Python floats, s first"),
        forbid=(scale_and_shift_reference, (LatentDiffusionLab, "measure_scale_factor")),
        fallback=scale_and_shift_reference,
        known_mistakes=[(per_channel, "one s for the whole latent, not one per channel averaged: Rombach et al. "
                                      "scale every element by the same number"),
                        (std_not_inverse, "s multiplies the latents to give them unit variance: it is 1 / std, not std")])


# ---------------------------------------------------------------------------------- encoding
def _tiny_autoencoder() -> KLAutoencoder:
    torch.manual_seed(case_seed(0))
    return KLAutoencoder(AutoencoderConfig(channels=[8, 16], groups=4, z_channels=4), channels=3).eval()


@graded("encode_to_latents")
def check_encode_to_latents(encode_to_latents: Callable) -> CheckResult:
    r"""``encode_to_latents(autoencoder, images, s, m) -> latents``: the scaled posterior means
    $s (\mu_\phi(x) - m)$, shape (N, 4, h, w), for images (N, 3, H, W) in [-1, 1]. ``autoencoder.encode(x)``
    returns the posterior (``.mu``, ``.logvar``); no sampling, no gradients needed. The lab's
    ``LatentDiffusionLab.to_latents`` (the same with the lab's s and m) may not be called."""
    gen = torch.Generator().manual_seed(case_seed(1))
    ae = _tiny_autoencoder()
    cases = [Case((ae, _randn(gen, 4, 3, 16, 16).clamp(-1, 1), 1.7, 0.3), label="4 images, s = 1.7, m = 0.3"),
             Case((ae, _randn(gen, 2, 3, 8, 8).clamp(-1, 1), 0.5, -0.2), label="2 images of 8x8, s = 0.5, m = -0.2")]

    def reference(autoencoder, images, s, m):
        with torch.no_grad():
            return (autoencoder.encode(images).mu - m) * s

    def forgot_shift(autoencoder, images, s, m):
        with torch.no_grad():
            return autoencoder.encode(images).mu * s

    def shift_after_scale(autoencoder, images, s, m):
        with torch.no_grad():
            return autoencoder.encode(images).mu * s - m

    def logvar_not_mu(autoencoder, images, s, m):
        with torch.no_grad():
            return (autoencoder.encode(images).logvar - m) * s

    return check_function(
        encode_to_latents, reference, cases, name="encode_to_latents", atol=1e-5,
        hint=Hint("the latent DDPM works on the encoder's posterior *mean* (no sampling), moved to zero mean and "
                  "scaled to unit spread with the (s, m) of exercise 1",
                  "the autoencoder's encode gives the posterior of each image; take its mean, take m away, then "
                  "multiply by s; no gradients are needed (torch.no_grad())"),
        forbid=(reference, (LatentDiffusionLab, "to_latents")),
        known_mistakes=[(forgot_shift, "subtract the mean m before scaling: the latents are s (z - m)"),
                        (shift_after_scale, "subtract m first, then scale: s (z - m), not s z - m"),
                        (logvar_not_mu, "use the posterior mean mu, not its log-variance")])


# ---------------------------------------------------------------------------------- a latent DDIM step
def _latent_scheduler() -> NoiseScheduler:
    return NoiseScheduler(SchedulerConfig(num_train_timesteps=1000, beta_schedule="cosine", prediction_type="v",
                                          clip_x0=False))


@graded("latent_ddim_step")
def check_latent_ddim_step(latent_ddim_step: Callable) -> CheckResult:
    r"""``latent_ddim_step(zt, v, t, prev_t, alpha_bar) -> z_prev``: one deterministic DDIM step (eta = 0) on a latent
    from a v-prediction. With $a_t = \bar\alpha_t$ (and $a_{-1} = 1$):
    $\hat z_0 = \sqrt{a_t} z_t - \sqrt{1 - a_t} v$, $\hat\epsilon = \sqrt{1 - a_t} z_t + \sqrt{a_t} v$,
    $z_{prev} = \sqrt{a_{prev}} \hat z_0 + \sqrt{1 - a_{prev}} \hat\epsilon$ (no clipping of $\hat z_0$).
    t, prev_t: ints (prev_t = -1 for the last step); alpha_bar: (T,) float64.
    The scheduler's ``ddim_step`` and its v conversions may not be called."""
    gen = torch.Generator().manual_seed(case_seed(2))
    scheduler = _latent_scheduler()
    alpha_bar = scheduler.alpha_bar
    cases = [Case((_randn(gen, 3, 4, 8, 8) * 2, _randn(gen, 3, 4, 8, 8), t, prev, alpha_bar), label=f"t = {t} -> {prev}")
             for t, prev in ((999, 959), (500, 460), (40, 0), (0, -1))]

    def reference(zt, v, t, prev_t, alpha_bar):
        latent = _latent_scheduler()
        latent.alpha_bar = alpha_bar.double()  # the table given (the notebook's run may have its own T)
        return latent.ddim_step(v, t, zt, prev_t, eta=0.0).prev_sample

    def eps_formula(zt, v, t, prev_t, alpha_bar):  # treats v as eps
        a = float(alpha_bar[t])
        a_prev = float(alpha_bar[prev_t]) if prev_t >= 0 else 1.0
        z0 = (zt - (1 - a) ** 0.5 * v) / a ** 0.5
        return a_prev ** 0.5 * z0 + (1 - a_prev) ** 0.5 * v

    def clipped(zt, v, t, prev_t, alpha_bar):
        a = float(alpha_bar[t])
        a_prev = float(alpha_bar[prev_t]) if prev_t >= 0 else 1.0
        z0 = (a ** 0.5 * zt - (1 - a) ** 0.5 * v).clamp(-1, 1)
        eps = (zt - a ** 0.5 * z0) / (1 - a) ** 0.5
        return a_prev ** 0.5 * z0 + (1 - a_prev) ** 0.5 * eps

    return check_function(
        latent_ddim_step, reference, cases, name="latent_ddim_step", atol=1e-4,
        hint=Hint("from v, recover both the clean latent and the noise that z_t is made of, then noise that clean "
                  "latent to level prev_t with that same noise (the forward process at prev_t), without clipping",
                  "z_t and v are the pair (z0, eps) turned by an angle whose cosine is sqrt(alpha_bar_t): turning "
                  "back gives the z0 and eps estimates (each a mix of z_t and v); then mix those two with the "
                  "square roots of alpha_bar at prev_t and of 1 minus it, where alpha_bar is 1 for prev_t < 0"),
        forbid=(reference, (NoiseScheduler, "ddim_step"), (NoiseScheduler, "pred_x0"), (NoiseScheduler, "x0_from_v"),
                (NoiseScheduler, "eps_from_v")),
        known_mistakes=[(eps_formula, "your step treats the prediction as eps, but the network predicts v "
                                      "(Salimans & Ho): the z0 and the eps estimates are both mixes of z_t and v"),
                        (clipped, "do not clip the x0 estimate to [-1, 1]: latents are not bounded like pixels")])
