r"""The ELBO of a VAE, term by term: no network, no parameters, just the math.

Kingma & Welling 2014, "Auto-Encoding Variational Bayes" (arXiv:1312.6114):

$\mathcal L(\theta, \phi; x) = -D_{KL}\big(q_\phi(z \mid x)\,\Vert\,p(z)\big) + \mathbb E_{q_\phi(z \mid x)}\big[\log p_\theta(x \mid z)\big]$  (eq. 3)

with a Gaussian posterior $q_\phi(z \mid x) = \mathcal N(\mu, \operatorname{diag}\sigma^2)$ (eq. 9), the prior
$p(z) = \mathcal N(0, I)$, the KL in closed form (Appendix B) and one reparameterised sample
$z = \mu + \sigma \odot \epsilon$ for the expectation (eq. 10). A conditional VAE (Sohn et al. 2015)
puts the caption $c$ beside $x$ in the encoder and beside $z$ in the decoder; the prior stays $\mathcal N(0, I)$.

The reconstruction term $-\log p_\theta(x \mid z)$ comes in three flavours (``LIKELIHOODS``):

- ``gaussian``: $\mathcal N(x; \hat x, \sigma^2 I)$, a continuous density (Appendix C.2);
- ``discretized_gaussian``: the same Gaussian integrated over each pixel's 8-bit bin
  (Ho et al. 2020, eq. 13): a probability, so its nats are honest discrete nats;
- ``bernoulli``: binary cross-entropy on $x$ mapped from [-1, 1] to [0, 1] (Appendix C.1).

Units. Every term is in **nats per image** (summed over the $D = C \cdot H \cdot W$ pixels, averaged
over the batch). A continuous density's nats are not comparable with discrete bits: to turn
them into bits per dimension we add $D \log 127.5$ (the 8-bit bin of width $2/255$ in [-1, 1]),
which is a bound only for a model of dequantised data (Theis et al. 2016); the
``discretized_gaussian`` likelihood needs no such correction. Bernoulli nats on non-binary pixels are not a normalised likelihood at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LIKELIHOODS = ("gaussian", "discretized_gaussian", "bernoulli")
SIGMA_MODES = ("fixed", "learned")


@dataclass
class ELBOTerms:
    """The terms of one batch, each (B,) in nats per image."""

    recon: torch.Tensor  # -log p(x|z), the reconstruction term
    kl: torch.Tensor  # D_KL(q(z|x) || p(z))
    loss: torch.Tensor  # recon + beta * kl: what is minimised (the negative beta-ELBO)

    @property
    def elbo(self) -> torch.Tensor:
        """$\\mathcal L = -(\\text{recon} + \\text{kl})$: the ELBO itself (beta = 1), higher is better."""
        return -(self.recon + self.kl)


# ------------------------------------------------------------------------------ posterior
def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    r"""The reparameterisation trick: $z = \mu + \sigma \odot \epsilon$, $\epsilon \sim \mathcal N(0, I)$ (K&W sec. 2.4, eq. 10).

    $z$ is a deterministic, differentiable function of $(\mu, \log\sigma^2)$ and of noise that
    does not depend on them, so gradients flow to the encoder. mu, logvar: (B, Z) -> z: (B, Z).
    ``eps`` is drawn from ``generator`` (or the global RNG) when not given.
    """
    if eps is None:
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)  # eps ~ N(0, I)
    std = torch.exp(0.5 * logvar)  # sigma = exp(log sigma^2 / 2)
    return mu + std * eps  # z = mu + sigma * eps


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    r"""Closed-form $D_{KL}(\mathcal N(\mu, \operatorname{diag}\sigma^2) \Vert \mathcal N(0, I))$, per example (K&W Appendix B, eq. 10):

    $D_{KL} = -\tfrac12 \sum_j \big(1 + \log\sigma_j^2 - \mu_j^2 - \sigma_j^2\big)$

    mu, logvar: (B, Z) -> (B,). Zero exactly when mu = 0 and logvar = 0, positive otherwise.
    """
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)  # (B,)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, prior_mu: torch.Tensor,
                prior_logvar: torch.Tensor) -> torch.Tensor:
    r"""$D_{KL}(\mathcal N(\mu, \operatorname{diag}\sigma^2) \Vert \mathcal N(m, \operatorname{diag}s^2))$ per example,
    the KL to a *learned* prior (e.g. the conditional prior $p(z \mid c)$ of Sohn et al. 2015):

    $D_{KL} = \tfrac12 \sum_j \big(\log s_j^2 - \log\sigma_j^2 + (\sigma_j^2 + (\mu_j - m_j)^2) / s_j^2 - 1\big)$

    All four: (B, Z) (or broadcastable) -> (B,). With m = 0, log s^2 = 0 it is :func:`kl_divergence`.
    """
    return 0.5 * torch.sum(prior_logvar - logvar + (logvar.exp() + (mu - prior_mu).pow(2)) / prior_logvar.exp() - 1,
                           dim=1)  # (B,)


# ------------------------------------------------------------------------------ likelihoods
def gaussian_nll(x0: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    r"""$-\log \mathcal N(x; \hat x, \sigma^2 I)$ per image, normalising constant included (K&W Appendix C.2):

    $-\log p(x \mid z) = \sum_i \Big[\frac{(x_i - \hat x_i)^2}{2\sigma^2} + \log\sigma + \tfrac12\log 2\pi\Big]$

    x0, mean: (B, C, H, W); log_sigma: broadcastable to them (a scalar for one global sigma) -> (B,).
    """
    log_sigma = log_sigma.expand_as(mean)  # (B, C, H, W)
    squared = (x0 - mean).pow(2) * torch.exp(-2 * log_sigma)  # (x - x_hat)^2 / sigma^2
    per_pixel = 0.5 * squared + log_sigma + 0.5 * math.log(2 * math.pi)
    return per_pixel.flatten(1).sum(dim=1)  # (B,)


def discretized_gaussian_nll(x0: torch.Tensor, mean: torch.Tensor, log_sigma: torch.Tensor,
                             levels: int = 256) -> torch.Tensor:
    r"""$-\log P(x \mid z)$ for 8-bit pixels in [-1, 1]: the Gaussian's mass on each pixel's bin (Ho et al. 2020, eq. 13):

    $P(x_i \mid z) = \int_{\delta_-(x_i)}^{\delta_+(x_i)} \mathcal N(t; \hat x_i, \sigma^2)\,dt$,
    $\delta_\pm(x) = x \pm \frac{1}{\text{levels} - 1}$, with the edge bins open to $\pm\infty$.

    x0, mean: (B, C, H, W); log_sigma broadcastable -> (B,). Computed in float64 (not on MPS) with the
    upper tail mirrored onto the lower one, so a bin far from the mean keeps a finite log and a gradient.
    """
    half_bin = 1.0 / (levels - 1)  # levels are 2 / (levels - 1) apart in [-1, 1]
    dtype = torch.float32 if x0.device.type == "mps" else torch.float64  # MPS has no float64
    x0, mean = x0.to(dtype), mean.to(dtype)
    sigma = torch.exp(log_sigma.to(dtype)).expand_as(mean)  # (B, C, H, W)
    upper = torch.where(x0 >= 1 - 1e-6, torch.full_like(x0, math.inf), (x0 + half_bin - mean) / sigma)
    lower = torch.where(x0 <= -1 + 1e-6, torch.full_like(x0, -math.inf), (x0 - half_bin - mean) / sigma)
    # Phi(b) - Phi(a) = Phi(-a) - Phi(-b): evaluate on the side where both ends sit in the lower tail
    flip = (upper + lower) > 0  # the bin lies mostly above the mean
    a = torch.where(flip, -upper, lower)  # a < b, (a + b) / 2 <= 0
    b = torch.where(flip, -lower, upper)
    log_cdf_a, log_cdf_b = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    ratio = torch.exp(log_cdf_a - log_cdf_b).clamp(max=1 - 1e-12)  # Phi(a) / Phi(b) < 1
    log_mass = log_cdf_b + torch.log1p(-ratio)  # log(Phi(b) - Phi(a))
    return -log_mass.flatten(1).sum(dim=1).float()  # (B,)


def bernoulli_nll(x0: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    r"""Binary cross-entropy per image, with $x$ mapped from [-1, 1] to [0, 1] (K&W Appendix C.1, eq. 11):

    $-\log p(x \mid z) = -\sum_i \big[x_i \log \hat p_i + (1 - x_i)\log(1 - \hat p_i)\big]$, $\hat p = \mathrm{sigmoid}(\text{logits})$

    A proper likelihood only for binary pixels; on grey levels it is not normalised (its minimum is
    the pixels' entropy, not 0). x0, logits: (B, C, H, W) -> (B,).
    """
    target = (x0 + 1) / 2  # [-1, 1] -> [0, 1]
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).sum(dim=1)  # (B,)


def reconstruction_nll(likelihood: str, x0: torch.Tensor, decoded: torch.Tensor,
                       log_sigma: torch.Tensor | None = None) -> torch.Tensor:
    """$-\\log p_\\theta(x \\mid z)$ per image under ``likelihood``; ``decoded`` is the mean (Gaussians) or logits (Bernoulli)."""
    if likelihood == "gaussian":
        return gaussian_nll(x0, decoded, log_sigma)
    if likelihood == "discretized_gaussian":
        return discretized_gaussian_nll(x0, decoded, log_sigma)
    if likelihood == "bernoulli":
        return bernoulli_nll(x0, decoded)
    raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")


def decoded_to_image(likelihood: str, decoded: torch.Tensor) -> torch.Tensor:
    """The image a decoder output stands for, in [-1, 1]: the mean $\\hat x$ (Gaussians) or $2\\,\\mathrm{sigmoid}(\\text{logits}) - 1$.

    We show the distribution's mean rather than a sample from it: per-pixel noise only adds grain.
    """
    if likelihood == "bernoulli":
        return (torch.sigmoid(decoded) * 2 - 1).clamp(-1, 1)  # [0, 1] -> [-1, 1]
    return decoded.clamp(-1, 1)


# ------------------------------------------------------------------------------ the ELBO
def kl_weight(step: int, beta: float, warmup_steps: int) -> float:
    r"""KL warm-up (Bowman et al. 2016; Sønderby et al. 2016): $\beta_t = \beta \min(1, t / T_\text{warm-up})$.

    Starting near $\beta = 0$ lets the decoder learn to use $z$ before the KL pulls the posterior to
    the prior (which otherwise tends to switch latent units off for good: posterior collapse)."""
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, step / warmup_steps)


def negative_elbo(recon: torch.Tensor, kl: torch.Tensor, beta: float = 1.0) -> ELBOTerms:
    r"""The loss of a $\beta$-VAE (Higgins et al. 2017, eq. 4), per image:

    $\text{loss} = -\log p_\theta(x \mid z) + \beta\, D_{KL}(q_\phi(z \mid x) \Vert p(z))$

    $\beta = 1$ is the negative ELBO of K&W eq. 10; $\beta > 1$ trades reconstruction for a
    posterior closer to the prior (a more usable prior, blurrier reconstructions), $\beta < 1$ the reverse.
    recon, kl: (B,) -> ELBOTerms of (B,) tensors.
    """
    return ELBOTerms(recon=recon, kl=kl, loss=recon + beta * kl)  # -L_beta = recon + beta * KL


def bits_per_dim(nats: torch.Tensor, dims: int, likelihood: str, levels: int = 256) -> torch.Tensor:
    r"""Nats per image -> bits per dimension: $\frac{\text{nats} + D\log\frac{\text{levels}-1}{2}}{D \ln 2}$ for a density on [-1, 1].

    The offset turns a density into a probability per 8-bit bin: a bound on the discrete code length
    for a model trained on uniformly dequantised data (Theis et al. 2016), an approximation otherwise;
    the discretised Gaussian is a probability already (no offset).
    For the Bernoulli likelihood on grey pixels the result is only a scaled loss, not a code length.
    """
    offset = dims * math.log((levels - 1) / 2) if likelihood == "gaussian" else 0.0  # -log(bin width) per pixel
    return (nats + offset) / (dims * math.log(2))
