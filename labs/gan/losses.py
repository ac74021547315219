r"""The GAN objectives and their regularisers, with no network inside.

Every function takes the critic's *scores* (or the critic as a callable, for the penalties
that differentiate it with respect to its input), so the same code trains the 2-D toy GAN
(``toy.py``) and the conditional DCGAN (``lab.py``). A "critic" is a discriminator whose
output is an unbounded score: a logit for ``bce``, a Wasserstein potential for ``wgan_gp``.

Losses, each as a pair (what the critic minimises, what the generator minimises):

- ``bce``: the minimax game of Goodfellow et al. 2014, eq. 1,
  $\min_G \max_D\ \mathbb E_x[\log D(x)] + \mathbb E_z[\log(1 - D(G(z)))]$ with $D = \sigma(\text{logit})$,
  the generator's *non-saturating* variant $\max_G \mathbb E_z[\log D(G(z))]$ (same paper, sec. 3),
  and one-sided label smoothing (Salimans et al. 2016, "Improved Techniques for Training GANs", sec. 3.4);
- ``wgan_gp``: the Wasserstein loss with the gradient penalty of Gulrajani et al. 2017,
  "Improved Training of Wasserstein GANs", eq. 3;
- ``hinge``: the hinge loss of Lim & Ye 2017 / Miyato et al. 2018 ("Spectral Normalization
  for GANs", eq. 16-17).

Regularisers: :func:`gradient_penalty` (WGAN-GP) and :func:`r1_penalty` (Mescheder et al. 2018,
"Which Training Methods for GANs do actually Converge?", eq. 9). For text conditioning:
:func:`matching_loss` (real images with a wrong prompt must score lower, after Reed et al. 2016).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

LOSSES = ("wgan_gp", "hinge", "bce")

Critic = Callable[[torch.Tensor], torch.Tensor]  # x (B, ...) -> scores (B,)


# ----------------------------------------------------------------------------- bce
def smoothed_targets(scores: torch.Tensor, real: bool, label_smoothing: float = 0.0) -> torch.Tensor:
    r"""Targets for the BCE critic: $1 - s$ for real images, $0$ for fakes.

    One-sided label smoothing (Salimans et al. 2016, sec. 3.4) softens only the *real* target:
    smoothing the fake target too would reward the generator for staying where it is.
    """
    value = 1.0 - label_smoothing if real else 0.0
    return torch.full_like(scores, value)


def bce_critic_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor,
                    label_smoothing: float = 0.0) -> torch.Tensor:
    r"""$-\mathbb E_x[(1-s)\log D(x) + s\log(1 - D(x))] - \mathbb E_z[\log(1 - D(G(z)))]$, $D = \sigma(\text{score})$.

    With $s = 0$ this is minus the value of the minimax game (Goodfellow et al. eq. 1): the
    discriminator *maximises* $\log D(x) + \log(1 - D(G(z)))$. Scores are logits;
    ``binary_cross_entropy_with_logits`` computes $\log\sigma$ stably.
    """
    real_term = F.binary_cross_entropy_with_logits(real_scores, smoothed_targets(real_scores, True, label_smoothing))
    fake_term = F.binary_cross_entropy_with_logits(fake_scores, smoothed_targets(fake_scores, False))
    return real_term + fake_term


def bce_generator_loss(fake_scores: torch.Tensor, non_saturating: bool = True) -> torch.Tensor:
    r"""Non-saturating: $-\mathbb E_z[\log D(G(z))]$; saturating (the minimax original): $\mathbb E_z[\log(1 - D(G(z)))]$.

    Early in training $D(G(z)) \approx 0$ and $\log(1 - D)$ is flat there: its gradient
    vanishes. $-\log D$ has the same fixed point but strong gradients where the generator is
    worst (Goodfellow et al. sec. 3).
    """
    if non_saturating:
        return F.binary_cross_entropy_with_logits(fake_scores, torch.ones_like(fake_scores))  # -log sigma(s)
    return -F.binary_cross_entropy_with_logits(fake_scores, torch.zeros_like(fake_scores))  # log(1 - sigma(s))


# ----------------------------------------------------------------------------- wasserstein
def wasserstein_critic_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    r"""$\mathbb E_z[D(G(z))] - \mathbb E_x[D(x)]$: the first two terms of Gulrajani et al. eq. 3.

    Minimising it maximises $\mathbb E[D(x)] - \mathbb E[D(G(z))]$, which for a 1-Lipschitz
    $D$ estimates the Wasserstein-1 distance (Kantorovich-Rubinstein duality, Arjovsky et al. 2017 eq. 3).
    """
    return fake_scores.mean() - real_scores.mean()


def wasserstein_generator_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    r"""$-\mathbb E_z[D(G(z))]$ (Gulrajani et al. Algorithm 1, line 11)."""
    return -fake_scores.mean()


# ----------------------------------------------------------------------------- hinge
def hinge_critic_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    r"""$\mathbb E_x[\max(0, 1 - D(x))] + \mathbb E_z[\max(0, 1 + D(G(z)))]$ (Miyato et al. 2018 eq. 16)."""
    return F.relu(1.0 - real_scores).mean() + F.relu(1.0 + fake_scores).mean()


def hinge_generator_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    r"""$-\mathbb E_z[D(G(z))]$ (Miyato et al. 2018 eq. 17)."""
    return -fake_scores.mean()


# ----------------------------------------------------------------------------- dispatch
def critic_loss(loss: str, real_scores: torch.Tensor, fake_scores: torch.Tensor,
                label_smoothing: float = 0.0) -> torch.Tensor:
    """What the critic minimises under ``loss`` (the penalties are added by the caller)."""
    if loss == "wgan_gp":
        return wasserstein_critic_loss(real_scores, fake_scores)
    if loss == "hinge":
        return hinge_critic_loss(real_scores, fake_scores)
    if loss == "bce":
        return bce_critic_loss(real_scores, fake_scores, label_smoothing)
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def generator_loss(loss: str, fake_scores: torch.Tensor, non_saturating: bool = True) -> torch.Tensor:
    """What the generator minimises under ``loss``."""
    if loss == "wgan_gp":
        return wasserstein_generator_loss(fake_scores)
    if loss == "hinge":
        return hinge_generator_loss(fake_scores)
    if loss == "bce":
        return bce_generator_loss(fake_scores, non_saturating)
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def matching_loss(right_scores: torch.Tensor, wrong_scores: torch.Tensor) -> torch.Tensor:
    r"""$\mathbb E_x[\mathrm{softplus}(D(x, \hat c) - D(x, c))] = -\mathbb E_x[\log\sigma(D(x, c) - D(x, \hat c))]$.

    The matching-aware critic of Reed et al. 2016 ("Generative Adversarial Text to Image Synthesis",
    GAN-CLS): a real image $x$ with its own prompt $c$ must score higher than with another image's
    prompt $\hat c$. Reed et al. add $\log(1 - D(x, \hat c))$ to the BCE loss; under the Wasserstein loss
    that term would be $-\mathbb E[D(x, \hat c)]$, unbounded below (the gradient penalty constrains
    $\nabla_x D$, not how $D$ reads the prompt) and the critic drives it to $-\infty$ instead of
    comparing real and fake. This *relative* form (a logistic loss on the score difference, as in the
    relativistic discriminator of Jolicoeur-Martineau 2019) is bounded for every loss and saturates
    once the right prompt wins clearly. With a projection critic, $\psi(\phi(x))$ cancels in the
    difference: the term trains only the projection and the text encoder.
    """
    return F.softplus(wrong_scores - right_scores).mean()


# ----------------------------------------------------------------------------- penalties
@dataclass
class GradientPenalty:
    penalty: torch.Tensor  # () the mean of (||grad||_2 - 1)^2, *without* the weight lambda
    grad_norm: torch.Tensor  # (B,) ||grad_x_hat D(x_hat)||_2 per interpolate
    interpolates: torch.Tensor  # (B, ...) x_hat = eps x + (1 - eps) x_tilde
    eps: torch.Tensor  # (B,) the mixing weights


def interpolate(real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    r"""$\hat x = \epsilon x + (1 - \epsilon)\tilde x$, one $\epsilon$ per sample (Gulrajani et al. Algorithm 1, line 6).

    real, fake: (B, ...); eps: (B,) -> (B, ...). Each $\hat x$ lies on the segment between
    its real and its fake point.
    """
    eps = eps.view(-1, *([1] * (real.dim() - 1))).to(real.dtype)  # (B, 1, ..., 1): broadcast over features
    return eps * real + (1.0 - eps) * fake


def gradient_penalty(critic: Critic, real: torch.Tensor, fake: torch.Tensor,
                     eps: torch.Tensor | None = None) -> GradientPenalty:
    r"""$\mathbb E_{\hat x}\big[(\lVert\nabla_{\hat x} D(\hat x)\rVert_2 - 1)^2\big]$ (Gulrajani et al. 2017, eq. 3).

    The optimal WGAN critic has gradient norm 1 almost everywhere on the segments between
    real and generated points (their Proposition 1), so the penalty is taken there, on random
    interpolates $\hat x$; $\epsilon \sim U[0, 1]$ per sample, drawn from the global RNG unless given.
    ``create_graph=True`` keeps the gradient differentiable, so the penalty trains the critic
    (a second-order backward). The norm is per sample, which is why the critic must not use
    BatchNorm: it would make $D(\hat x_i)$ depend on the other samples of the batch.
    The caller multiplies by $\lambda$ (``gp_weight``, 10 in the paper).

    Computed in fp32 whatever the surrounding autocast: under fp16 the inner gradient would be
    taken on unscaled fp16 scores (the gradient scaler only scales the outer loss) and can
    underflow to zero. ``critic`` must accept fp32 inputs (cast its other inputs with ``.float()``).
    """
    B = real.shape[0]
    if eps is None:
        eps = torch.rand(B, device=real.device)  # eps ~ U[0, 1], one per sample
    x_hat = interpolate(real.detach().float(), fake.detach().float(), eps).requires_grad_(True)  # (B, ...)
    with torch.autocast(x_hat.device.type, enabled=False):
        scores = critic(x_hat).float()  # D(x_hat): (B,)
        (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)  # grad_x_hat D(x_hat): (B, ...)
    grad_norm = grad.flatten(1).norm(2, dim=1)  # ||grad||_2 per sample: (B,)
    penalty = ((grad_norm - 1.0) ** 2).mean()  # E[(||grad||_2 - 1)^2]
    return GradientPenalty(penalty=penalty, grad_norm=grad_norm, interpolates=x_hat.detach(), eps=eps)


def r1_penalty(critic: Critic, real: torch.Tensor) -> torch.Tensor:
    r"""$\mathbb E_{x \sim p_\text{data}}\lVert\nabla_x D(x)\rVert_2^2$ (Mescheder et al. 2018, eq. 9, without $\gamma/2$).

    Penalises the critic's gradient on *real* data only, which makes the game locally
    convergent; the caller multiplies by $\gamma / 2$ (``r1_gamma / 2``). In fp32 under any autocast,
    like :func:`gradient_penalty`.
    """
    x = real.detach().float().requires_grad_(True)  # (B, ...)
    with torch.autocast(x.device.type, enabled=False):
        (grad,) = torch.autograd.grad(critic(x).float().sum(), x, create_graph=True)  # (B, ...)
    return grad.flatten(1).pow(2).sum(dim=1).mean()
