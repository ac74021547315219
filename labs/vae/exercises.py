"""Checks for the VAE exercises (notebook 02), each graded under its exercise id:

- ``reparameterize`` (:func:`check_reparameterize`): $z = \\mu + \\sigma \\odot \\epsilon$, values *and* gradients;
- ``kl_divergence`` (:func:`check_kl_divergence`): the closed-form KL to $\\mathcal N(0, I)$;
- ``gaussian_nll`` (:func:`check_gaussian_nll`): $-\\log \\mathcal N(x; \\hat x, \\sigma^2 I)$ with its normalising
  constant;
- ``beta_elbo_loss`` (:func:`check_beta_elbo_loss`): the per-image loss $-\\log p(x \\mid z) + \\beta\\,D_{KL}$.

Every reference is the lab's own code (``labs.vae.elbo``), so an exercise checks the student against exactly what
the trained model uses. While the student's code runs, that function raises when called, and so do the torch
functions that would give the answer in one call (``torch.distributions.kl_divergence`` for the KL,
``Normal.log_prob`` and ``F.gaussian_nll_loss`` for the likelihood). The loss exercise forbids only the lab's
``negative_elbo``: it is about combining the two terms, and a student whose KL or likelihood has not passed yet
combines the lab's versions of them (what ``CheckResult.pick`` hands on).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from labs.vae import gaussian_kl, gaussian_nll, kl_divergence, negative_elbo, reparameterize

from lab_utils.core.exercises.cases import Case, Hint
from lab_utils.core.exercises.checks import CheckResult, check_function
from lab_utils.core.exercises.records import case_seed, graded


def _randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=gen)


def _posterior_cases(seed: int) -> list[Case]:
    """(mu, logvar) pairs: random, the prior itself, very confident and very unsure posteriors."""
    gen = torch.Generator().manual_seed(case_seed(seed))
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


@graded("reparameterize")
def check_reparameterize(student_fn: Callable) -> CheckResult:
    r"""``reparameterize(mu, logvar, eps) -> z`` with $z = \mu + \exp(\tfrac12 \log\sigma^2) \odot \epsilon$.

    Compares z and the gradients that flow back to mu and logvar (the point of the trick). The lab's
    ``reparameterize`` may not be called; it is what ``.pick`` hands on when the check fails."""
    gen = torch.Generator().manual_seed(case_seed(10))
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
        hint=Hint("z is the posterior's mean plus its standard deviation times the given noise eps; the encoder "
                  "hands you the log of the variance, so turn logvar into a standard deviation first, with "
                  "differentiable torch operations so that gradients reach mu and logvar",
                  "logvar is log sigma^2: the standard deviation is the exponential of half of it (not of all of "
                  "it, and not logvar itself); scale eps by it elementwise and shift by mu, all (B, Z)"),
        forbid=(reparameterize,), fallback=reparameterize,
        known_mistakes=[
            (_values_and_gradients(std_is_logvar), "logvar is the log of the variance, not the standard deviation: "
                                                   "turn it into sigma before scaling the noise"),
            (_values_and_gradients(std_is_variance), "that scales the noise by the variance sigma^2 (the exponential "
                                                     "of logvar); it is scaled by the standard deviation sigma, the "
                                                     "square root of the variance"),
            (_values_and_gradients(std_without_half), "that is the fourth root of the variance: the standard "
                                                      "deviation is its square root (check the factor 1/2)"),
        ])


# ---------------------------------------------------------------------------------- KL
@graded("kl_divergence")
def check_kl_divergence(student_fn: Callable) -> CheckResult:
    r"""``kl_divergence(mu, logvar) -> (B,)``: $-\tfrac12\sum_j(1 + \log\sigma_j^2 - \mu_j^2 - \sigma_j^2)$ per example.

    The lab's ``kl_divergence`` and ``gaussian_kl``, and ``torch.distributions.kl_divergence``, may not be called."""

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
        hint=Hint("use the closed form from the text: every latent dimension adds a term of its own, zero when its "
                  "mean is 0 and its variance 1, and the KL of the whole code is the sum of those terms, one number "
                  "per example",
                  "per dimension: minus one half of (one, plus the log-variance, minus the squared mean, minus the "
                  "variance), where the variance is the exponential of logvar; sum over the latent dimension "
                  "(dim 1), so that (B, Z) inputs give a (B,) result"),
        forbid=(kl_divergence, gaussian_kl, torch.distributions.kl.kl_divergence,  # every alias of torch's,
                (torch.distributions, "kl_divergence")),  # and by its usual name, so the message names it
        known_mistakes=[
            (wrong_sign, "the sign: a KL divergence is >= 0; it is MINUS one half times the sum"),
            (mean_over_latents, "sum over the latent dimensions, do not average: the KL of independent "
                                "dimensions adds up"),
            (no_one, "the '1 +' inside the sum is missing (it makes the KL zero at the prior)"),
            (logvar_as_variance, "the variance sigma^2 is the exponential of logvar, not logvar itself"),
        ])


# ---------------------------------------------------------------------------------- Gaussian NLL
def _likelihood_cases(seed: int) -> list[Case]:
    gen = torch.Generator().manual_seed(case_seed(seed))
    x0 = _randn(gen, 3, 3, 8, 8).clamp(-1, 1)
    return [
        Case((x0, x0 + _randn(gen, 3, 3, 8, 8, scale=0.1), torch.tensor(math.log(0.1))), label="sigma = 0.1"),
        Case((x0, x0 + _randn(gen, 3, 3, 8, 8, scale=0.5), torch.tensor(0.0)), label="sigma = 1"),
        Case((x0[:2, :1], x0[:2, :1].clone(), torch.tensor(math.log(0.05))),
             label="a perfect 1-channel reconstruction: only the normalising constant is left"),
    ]


@graded("gaussian_nll")
def check_gaussian_nll(student_fn: Callable) -> CheckResult:
    r"""``gaussian_nll(x0, mean, log_sigma) -> (B,)``:
    $\sum_i \big[\frac{(x_i - \hat x_i)^2}{2\sigma^2} + \log\sigma + \tfrac12\log 2\pi\big]$ per image.

    The lab's ``gaussian_nll``, ``torch.distributions.Normal.log_prob`` and ``F.gaussian_nll_loss`` may not be
    called."""

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
        hint=Hint("the negative log of a Gaussian density, pixel by pixel: the squared error measured in units of "
                  "the variance, plus the normalising constant; an image's NLL is the sum over its pixels",
                  "sigma is the exponential of log_sigma, so the variance is the exponential of twice it; each pixel "
                  "costs its squared error over twice the variance, plus log sigma, plus half of log(2 pi); sum "
                  "over every dimension but the batch, giving (B,) (log_sigma is 0-dim and broadcasts)"),
        forbid=(gaussian_nll, torch.distributions.Normal.log_prob, F.gaussian_nll_loss),
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


@graded("beta_elbo_loss")
def check_beta_elbo_loss(student_fn: Callable) -> CheckResult:
    r"""``beta_elbo_loss(x0, mean, mu, logvar, log_sigma, beta) -> (B,)``:
    $-\log \mathcal N(x; \hat x, \sigma^2 I) + \beta\, D_{KL}(\mathcal N(\mu, \sigma_z^2) \Vert \mathcal N(0, I))$ per image.

    The reference is an adapter around the lab's ``negative_elbo``, which may not be called. The two terms may come
    from the lab (a student whose own KL or likelihood has not passed yet uses the lab's, through ``.pick``)."""
    gen = torch.Generator().manual_seed(case_seed(14))
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
        hint=Hint("the loss is the reconstruction term plus the KL term weighted by beta; you wrote both terms "
                  "above, and each gives one number per image",
                  "the reconstruction term is your Gaussian NLL of x0 under the decoder's mean and sigma, the KL "
                  "term your closed-form KL of (mu, logvar); only the KL is weighted; keep one value per image (B,), "
                  "no mean over the batch"),
        forbid=(negative_elbo,), fallback=_beta_elbo_reference,
        known_mistakes=[
            (beta_on_reconstruction, "beta multiplies the KL term, not the reconstruction term"),
            (batch_mean, "return one value per image (B,); the training loop averages over the batch"),
            (plus_kl, "the loss is the NEGATIVE ELBO: reconstruction NLL plus beta times the KL"),
        ])
