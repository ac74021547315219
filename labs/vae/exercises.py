"""Checks for the VAE exercises (notebook 02).

Every reference is the lab's own code (``labs.vae.elbo``), so an exercise checks the student
against exactly what the trained model uses:

- :func:`check_reparameterize`: $z = \\mu + \\sigma \\odot \\epsilon$, values *and* gradients;
- :func:`check_kl_divergence`: the closed-form KL to $\\mathcal N(0, I)$;
- :func:`check_gaussian_nll`: $-\\log \\mathcal N(x; \\hat x, \\sigma^2 I)$ with its normalising constant;
- :func:`check_beta_elbo_loss`: the per-image loss $-\\log p(x \\mid z) + \\beta\\,D_{KL}$.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from labs.vae import gaussian_nll, kl_divergence, negative_elbo, reparameterize

from lab_utils.exercises import Case, check_function


def _randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=gen)


def _posterior_cases(seed: int) -> list[Case]:
    """(mu, logvar) pairs: random, the prior itself, very confident and very unsure posteriors."""
    gen = torch.Generator().manual_seed(seed)
    return [
        Case((_randn(gen, 4, 6), _randn(gen, 4, 6)), label="random mu and logvar, (B, Z) = (4, 6)"),
        Case((torch.zeros(3, 5), torch.zeros(3, 5)), label="mu = 0, logvar = 0: the prior itself"),
        Case((_randn(gen, 2, 3, scale=3.0), torch.full((2, 3), -6.0)), label="a confident posterior, sigma ~ 0.05"),
        Case((_randn(gen, 5, 2), torch.full((5, 2), 2.0)), label="a wide posterior, sigma ~ 2.7"),
    ]


# ---------------------------------------------------------------------------------- reparameterise
def _values_and_gradients(reparameterize_fn: Callable) -> Callable:
    """Wrap ``fn(mu, logvar, eps)`` to return z and the gradients of sum(z * w) with respect to mu and logvar."""

    def run(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor, weights: torch.Tensor):
        mu, logvar = mu.clone().requires_grad_(True), logvar.clone().requires_grad_(True)
        z = reparameterize_fn(mu, logvar, eps)
        if not isinstance(z, torch.Tensor) or z.grad_fn is None:
            raise RuntimeError("z carries no gradient: build it from mu and logvar with differentiable "
                               "operations (no torch.normal, no .detach(), no .item())")
        grad_mu, grad_logvar = torch.autograd.grad((z * weights).sum(), (mu, logvar), allow_unused=True)
        if grad_mu is None or grad_logvar is None:
            missing = [name for name, g in (("mu", grad_mu), ("logvar", grad_logvar)) if g is None]
            raise RuntimeError(f"no gradient reaches {' and '.join(missing)}")
        return {"z": z.detach(), "dz/dmu": grad_mu, "dz/dlogvar": grad_logvar}

    return run


def check_reparameterize(student_fn: Callable) -> bool:
    r"""``reparameterize(mu, logvar, eps) -> z`` with $z = \mu + \exp(\tfrac12 \log\sigma^2) \odot \epsilon$.

    Compares z and the gradients that flow back to mu and logvar (the point of the trick)."""
    gen = torch.Generator().manual_seed(10)
    cases = []
    for case in _posterior_cases(11):
        mu, logvar = case.args
        cases.append(Case((mu, logvar, _randn(gen, *mu.shape), _randn(gen, *mu.shape)), label=case.label))

    def reference(mu, logvar, eps):
        return reparameterize(mu, logvar, eps)

    def std_is_logvar(mu, logvar, eps):
        return mu + logvar * eps

    def std_is_variance(mu, logvar, eps):
        return mu + logvar.exp() * eps

    def std_without_half(mu, logvar, eps):
        return mu + logvar.exp().sqrt().sqrt() * eps

    return check_function(
        _values_and_gradients(student_fn), _values_and_gradients(reference), cases, name="reparameterize",
        hint="sigma = exp(0.5 * logvar) (logvar is log sigma^2), then z = mu + sigma * eps",
        known_mistakes=[
            (_values_and_gradients(std_is_logvar), "logvar is log(sigma^2), not sigma: take exp(0.5 * logvar)"),
            (_values_and_gradients(std_is_variance), "exp(logvar) is the variance sigma^2; the noise is scaled by "
                                                     "the standard deviation sigma = exp(0.5 * logvar)"),
            (_values_and_gradients(std_without_half), "sigma = exp(0.5 * logvar): check the factor 1/2"),
        ])


# ---------------------------------------------------------------------------------- KL
def check_kl_divergence(student_fn: Callable) -> bool:
    r"""``kl_divergence(mu, logvar) -> (B,)``: $-\tfrac12\sum_j(1 + \log\sigma_j^2 - \mu_j^2 - \sigma_j^2)$ per example."""

    def wrong_sign(mu, logvar):
        return -kl_divergence(mu, logvar)

    def mean_over_latents(mu, logvar):
        return kl_divergence(mu, logvar) / mu.shape[1]

    def no_one(mu, logvar):
        return -0.5 * torch.sum(logvar - mu.pow(2) - logvar.exp(), dim=1)

    def logvar_as_variance(mu, logvar):
        return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar, dim=1)

    return check_function(
        student_fn, kl_divergence, _posterior_cases(12), name="kl_divergence",
        hint="sum over the latent dimension (dim=1) of -0.5 * (1 + logvar - mu**2 - exp(logvar)); one value "
             "per example, zero when mu = 0 and logvar = 0",
        known_mistakes=[
            (wrong_sign, "the sign: a KL divergence is >= 0; it is MINUS one half times the sum"),
            (mean_over_latents, "sum over the latent dimensions, do not average: the KL of independent "
                                "dimensions adds up"),
            (no_one, "the '1 +' inside the sum is missing (it makes the KL zero at the prior)"),
            (logvar_as_variance, "sigma^2 = exp(logvar), not logvar"),
        ])


# ---------------------------------------------------------------------------------- Gaussian NLL
def _likelihood_cases(seed: int) -> list[Case]:
    gen = torch.Generator().manual_seed(seed)
    x0 = _randn(gen, 3, 3, 8, 8).clamp(-1, 1)
    return [
        Case((x0, x0 + _randn(gen, 3, 3, 8, 8, scale=0.1), torch.tensor(math.log(0.1))), label="sigma = 0.1"),
        Case((x0, x0 + _randn(gen, 3, 3, 8, 8, scale=0.5), torch.tensor(0.0)), label="sigma = 1"),
        Case((x0[:2, :1], x0[:2, :1].clone(), torch.tensor(math.log(0.05))),
             label="a perfect 1-channel reconstruction: only the normalising constant is left"),
    ]


def check_gaussian_nll(student_fn: Callable) -> bool:
    r"""``gaussian_nll(x0, mean, log_sigma) -> (B,)``:
    $\sum_i \big[\frac{(x_i - \hat x_i)^2}{2\sigma^2} + \log\sigma + \tfrac12\log 2\pi\big]$ per image."""

    def no_constant(x0, mean, log_sigma):
        return gaussian_nll(x0, mean, log_sigma) - x0[0].numel() * (log_sigma + 0.5 * math.log(2 * math.pi))

    def no_two_pi(x0, mean, log_sigma):
        return gaussian_nll(x0, mean, log_sigma) - x0[0].numel() * 0.5 * math.log(2 * math.pi)

    def mean_over_pixels(x0, mean, log_sigma):
        return gaussian_nll(x0, mean, log_sigma) / x0[0].numel()

    def mse_only(x0, mean, log_sigma):
        return (x0 - mean).pow(2).flatten(1).sum(1)

    return check_function(
        student_fn, gaussian_nll, _likelihood_cases(13), name="gaussian_nll",
        hint="per pixel: (x0 - mean)**2 / (2 sigma^2) + log sigma + 0.5 log(2 pi) with sigma = exp(log_sigma); "
             "then sum over (C, H, W), one value per image",
        known_mistakes=[
            (no_constant, "the normalising constant log sigma + 0.5 log(2 pi) per pixel is missing: without it "
                          "the nats are not a log-likelihood and sigma cannot be learned"),
            (no_two_pi, "the 0.5 * log(2 pi) per pixel is missing"),
            (mean_over_pixels, "sum over the pixels, do not average: nats per image are a sum over pixels"),
            (mse_only, "that is the squared error: divide by 2 sigma^2 and add the normalising constant"),
        ])


# ---------------------------------------------------------------------------------- the ELBO
def _beta_elbo_reference(x0, mean, mu, logvar, log_sigma, beta):
    return negative_elbo(gaussian_nll(x0, mean, log_sigma), kl_divergence(mu, logvar), beta).loss


def check_beta_elbo_loss(student_fn: Callable) -> bool:
    r"""``beta_elbo_loss(x0, mean, mu, logvar, log_sigma, beta) -> (B,)``:
    $-\log \mathcal N(x; \hat x, \sigma^2 I) + \beta\, D_{KL}(\mathcal N(\mu, \sigma_z^2) \Vert \mathcal N(0, I))$ per image."""
    gen = torch.Generator().manual_seed(14)
    cases = []
    for beta, sigma in ((1.0, 0.1), (4.0, 0.2), (0.0, 0.5)):
        x0 = _randn(gen, 3, 1, 8, 8).clamp(-1, 1)
        cases.append(Case((x0, x0 + _randn(gen, 3, 1, 8, 8, scale=0.2), _randn(gen, 3, 4), _randn(gen, 3, 4),
                           torch.tensor(math.log(sigma)), beta), label=f"beta = {beta}, sigma = {sigma}"))

    def beta_on_reconstruction(x0, mean, mu, logvar, log_sigma, beta):
        return beta * gaussian_nll(x0, mean, log_sigma) + kl_divergence(mu, logvar)

    def batch_mean(x0, mean, mu, logvar, log_sigma, beta):
        return _beta_elbo_reference(x0, mean, mu, logvar, log_sigma, beta).mean()

    def plus_kl(x0, mean, mu, logvar, log_sigma, beta):
        return gaussian_nll(x0, mean, log_sigma) - beta * kl_divergence(mu, logvar)

    return check_function(
        student_fn, _beta_elbo_reference, cases, name="beta_elbo_loss",
        hint="gaussian_nll(x0, mean, log_sigma) + beta * kl_divergence(mu, logvar), one value per image",
        known_mistakes=[
            (beta_on_reconstruction, "beta multiplies the KL term, not the reconstruction term"),
            (batch_mean, "return one value per image (B,); the training loop averages over the batch"),
            (plus_kl, "the loss is the NEGATIVE ELBO: reconstruction NLL plus beta times the KL"),
        ])
