"""Checks for the GAN exercises (notebook 01): the BCE critic loss with one-sided label smoothing,
the non-saturating generator loss, the WGAN-GP gradient penalty and the projection discriminator's output.

Each check compares the student's code with the reference in :mod:`labs.gan` on fixed seeded
inputs and recognises the usual wrong answers to give a precise hint.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from labs.gan.losses import bce_critic_loss, bce_generator_loss, gradient_penalty
from labs.gan.model import ProjectionHead

from lab_utils.exercises import Case, check_function, check_module


def _randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=gen)


# --------------------------------------------------------------------------- 1. BCE critic loss
BCE_CRITIC_HINT = (
    "loss = BCE(real_scores, target 1 - label_smoothing) + BCE(fake_scores, target 0), each a mean over the "
    "batch; the scores are logits, so use F.binary_cross_entropy_with_logits (stable for large |score|)"
)


def bce_critic_cases(seed: int = 0) -> list[Case]:
    gen = torch.Generator().manual_seed(seed)
    return [
        Case((_randn(gen, 16), _randn(gen, 16)), {"label_smoothing": 0.0}, label="no smoothing"),
        Case((_randn(gen, 16, scale=3.0), _randn(gen, 16, scale=3.0)), {"label_smoothing": 0.1},
             label="label_smoothing=0.1"),
        Case((_randn(gen, 8) + 2.0, _randn(gen, 8) - 2.0), {"label_smoothing": 0.25}, label="label_smoothing=0.25"),
        Case((torch.tensor([40.0, -40.0, 0.0]), torch.tensor([-40.0, 40.0, 5.0])), {"label_smoothing": 0.1},
             label="scores of +-40 (log(sigmoid) underflows if computed naively)"),
    ]


def _bce_two_sided(real, fake, label_smoothing=0.0):
    return (F.binary_cross_entropy_with_logits(real, torch.full_like(real, 1 - label_smoothing))
            + F.binary_cross_entropy_with_logits(fake, torch.full_like(fake, label_smoothing)))


def _bce_no_smoothing(real, fake, label_smoothing=0.0):
    return bce_critic_loss(real, fake, 0.0)


def _bce_swapped(real, fake, label_smoothing=0.0):
    return bce_critic_loss(fake, real, label_smoothing)


def _bce_smoothing_sign(real, fake, label_smoothing=0.0):
    return (F.binary_cross_entropy_with_logits(real, torch.full_like(real, label_smoothing))
            + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))


BCE_CRITIC_MISTAKES: list[tuple[Callable, str]] = [
    (_bce_two_sided, "it matches *two-sided* smoothing (fake target = label_smoothing): smooth only the real "
                     "target, or the generator is rewarded for staying where it is (Salimans et al. sec. 3.4)"),
    (_bce_no_smoothing, "it matches the loss without smoothing: the real images' target is 1 - label_smoothing"),
    (_bce_swapped, "it matches the loss with real and fake swapped: real images get the target 1 - s, fakes 0"),
    (_bce_smoothing_sign, "it matches a real target of label_smoothing: the target is 1 - label_smoothing"),
]


def check_bce_critic_loss(fn: Callable, name: str = "bce_critic_loss") -> bool:
    """Check ``fn(real_scores, fake_scores, label_smoothing=0.0) -> scalar`` against
    :func:`labs.gan.bce_critic_loss`."""
    return check_function(fn, bce_critic_loss, bce_critic_cases(), name=name, hint=BCE_CRITIC_HINT,
                          known_mistakes=BCE_CRITIC_MISTAKES)


# --------------------------------------------------------------------------- 2. generator loss
GENERATOR_HINT = ("the non-saturating loss is -mean(log sigmoid(fake_scores)) = "
                  "F.binary_cross_entropy_with_logits(fake_scores, torch.ones_like(fake_scores))")


def generator_cases(seed: int = 1) -> list[Case]:
    gen = torch.Generator().manual_seed(seed)
    return [
        Case((_randn(gen, 16),), label="scores around 0"),
        Case((_randn(gen, 16) - 4.0,), label="a discriminator that is winning (D(G(z)) near 0)"),
        Case((torch.tensor([-50.0, 50.0, 0.0]),), label="scores of +-50"),
    ]


def _saturating(fake):
    return bce_generator_loss(fake, non_saturating=False)


def _sign_flipped(fake):
    return -bce_generator_loss(fake)


def _fake_target_zero(fake):
    return F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))


GENERATOR_MISTAKES: list[tuple[Callable, str]] = [
    (_saturating, "it matches the *saturating* loss mean(log(1 - D(G(z)))): the exercise asks for "
                  "-mean(log D(G(z))), which has strong gradients exactly where the generator is bad"),
    (_sign_flipped, "it matches mean(log D(G(z))): the generator *minimises* -log D(G(z)); flip the sign"),
    (_fake_target_zero, "it matches the discriminator's loss on fakes (target 0): the generator wants its "
                        "fakes classified as real (target 1)"),
]


def check_generator_loss(fn: Callable, name: str = "non_saturating_generator_loss") -> bool:
    """Check ``fn(fake_scores) -> scalar`` against the non-saturating loss :func:`labs.gan.bce_generator_loss`."""
    return check_function(fn, bce_generator_loss, generator_cases(), name=name, hint=GENERATOR_HINT,
                          known_mistakes=GENERATOR_MISTAKES)


# --------------------------------------------------------------------------- 3. gradient penalty
GP_HINT = (
    "x_hat = eps * real + (1 - eps) * fake with eps reshaped to (B, 1, ...); x_hat.requires_grad_(True); "
    "grad = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)[0]; one L2 norm per sample "
    "over all its features (grad.flatten(1).norm(dim=1)); return ((norm - 1) ** 2).mean()"
)


class LinearCritic(nn.Module):
    r"""$D(x) = w^\top \mathrm{vec}(x) + b$: its input gradient is $w$ everywhere, so the penalty is $(\lVert w\rVert - 1)^2$."""

    def __init__(self, weight: torch.Tensor, bias: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(torch.tensor(bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight + self.bias  # (B,)


class SmallCritic(nn.Module):
    """A non-linear critic (its gradient norm differs from sample to sample)."""

    def __init__(self, in_features: int, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1)).squeeze(-1)  # (B,)


def gradient_penalty_cases(seed: int = 2) -> list[Case]:
    gen = torch.Generator().manual_seed(seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the small critics' initial weights
    small_2d, small_image = SmallCritic(2), SmallCritic(3 * 4 * 4)
    torch.random.set_rng_state(torch_state)
    with torch.no_grad():
        for critic in (small_2d, small_image):
            for param in critic.parameters():
                param.mul_(3.0)  # gradient norms well away from 1
    eps = torch.rand(6, generator=gen)
    return [
        Case((LinearCritic(torch.tensor([3.0, 4.0])), _randn(gen, 6, 2), _randn(gen, 6, 2), eps),
             label="linear critic with |w| = 5: penalty (5 - 1)^2 = 16"),
        Case((LinearCritic(torch.tensor([0.6, 0.8])), _randn(gen, 6, 2), _randn(gen, 6, 2), eps),
             label="linear critic with |w| = 1: penalty 0"),
        Case((small_2d, _randn(gen, 6, 2), _randn(gen, 6, 2), eps), label="non-linear critic on 2-D points"),
        Case((small_image, _randn(gen, 6, 3, 4, 4), _randn(gen, 6, 3, 4, 4), eps),
             label="non-linear critic on (B, 3, 4, 4) images"),
    ]


def _with_critic_gradient(fn: Callable) -> Callable:
    """Run ``fn`` and also return d(penalty)/d(critic weights): that is what trains the critic."""

    def run(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor) -> dict:
        penalty = fn(critic, real, fake, eps)
        if not isinstance(penalty, torch.Tensor) or penalty.dim() != 0:
            raise TypeError(f"expected a 0-dim tensor, got {type(penalty).__name__} "
                            f"{tuple(penalty.shape) if isinstance(penalty, torch.Tensor) else ''}")
        if not penalty.requires_grad:
            raise ValueError("the penalty does not depend on the critic's weights, so it cannot train the critic: "
                             "pass create_graph=True to torch.autograd.grad")
        grads = torch.autograd.grad(penalty, list(critic.parameters()), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, critic.parameters())]
        return {"penalty": penalty.detach(), "d_penalty_d_critic_weights": grads}

    return run


def _reference_penalty(critic, real, fake, eps):
    return gradient_penalty(critic, real, fake, eps).penalty


def _batch_norm(critic, real, fake, eps):
    x_hat = (eps.view(-1, *[1] * (real.dim() - 1)) * real + (1 - eps.view(-1, *[1] * (real.dim() - 1))) * fake)
    x_hat.requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return (grad.norm() - 1) ** 2


def _squared_norm(critic, real, fake, eps):
    x_hat = (eps.view(-1, *[1] * (real.dim() - 1)) * real + (1 - eps.view(-1, *[1] * (real.dim() - 1))) * fake)
    x_hat.requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).pow(2).sum(1) - 1) ** 2).mean()


def _one_sided(critic, real, fake, eps):
    x_hat = (eps.view(-1, *[1] * (real.dim() - 1)) * real + (1 - eps.view(-1, *[1] * (real.dim() - 1))) * fake)
    x_hat.requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return (F.relu(grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def _at_real_points(critic, real, fake, eps):
    return gradient_penalty(critic, real, real, eps).penalty


def _eps_swapped(critic, real, fake, eps):
    return gradient_penalty(critic, fake, real, eps).penalty


GP_MISTAKES: list[tuple[Callable, str]] = [
    (_with_critic_gradient(_batch_norm), "it matches one norm over the whole batch: the norm is per sample, "
                                         "grad.flatten(1).norm(dim=1), then the mean of (norm - 1)^2"),
    (_with_critic_gradient(_squared_norm), "it matches (|grad|^2 - 1)^2: use the norm itself, not its square"),
    (_with_critic_gradient(_one_sided), "it matches the one-sided penalty max(0, |grad| - 1)^2: WGAN-GP "
                                        "penalises norms below 1 as well"),
    (_with_critic_gradient(_at_real_points), "it matches the penalty at the real points: take it at the "
                                             "interpolates x_hat = eps * real + (1 - eps) * fake"),
    (_with_critic_gradient(_eps_swapped), "it matches x_hat = eps * fake + (1 - eps) * real: eps multiplies "
                                          "the real points"),
]


def check_gradient_penalty(fn: Callable, name: str = "gradient_penalty") -> bool:
    """Check ``fn(critic, real, fake, eps) -> scalar`` against :func:`labs.gan.gradient_penalty`: the
    value, and its gradient with respect to the critic's weights (which needs ``create_graph=True``)."""
    return check_function(_with_critic_gradient(fn), _with_critic_gradient(_reference_penalty),
                          gradient_penalty_cases(), name=name, hint=GP_HINT, known_mistakes=GP_MISTAKES,
                          atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- 4. projection head
PROJECTION_HINT = (
    "self.psi = nn.Linear(feature_dim, 1) and self.embed = nn.Linear(cond_dim, feature_dim, bias=False); "
    "forward returns psi(features).squeeze(-1) + (embed(y) * features).sum(dim=-1), shape (B,)"
)


def projection_cases(seed: int = 3) -> tuple[Case, list[Case]]:
    gen = torch.Generator().manual_seed(seed)
    init = Case((12, 5), label="feature_dim=12, cond_dim=5")
    cases = [
        Case((_randn(gen, 4, 12), _randn(gen, 4, 5)), label="4 images"),
        Case((_randn(gen, 1, 12, scale=3.0), _randn(gen, 1, 5)), label="one image"),
        Case((_randn(gen, 3, 12), torch.zeros(3, 5)), label="zero condition: only psi(phi(x)) remains"),
    ]
    return init, cases


def check_projection_head(cls: Callable[..., nn.Module], name: str = "ProjectionHead") -> bool:
    """Check a student's ``cls(feature_dim, cond_dim)`` layer, ``forward(features, y) -> (B,)``,
    against :class:`labs.gan.ProjectionHead` (same parameter names: ``psi``, ``embed``)."""
    init, cases = projection_cases()
    return check_module(cls, ProjectionHead, init, cases, name=name, hint=PROJECTION_HINT)
