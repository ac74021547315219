"""Checks for the GAN exercises (notebook 01), each the graded check of one exercise id:

    bce_critic_loss   the discriminator's BCE loss with one-sided label smoothing
    generator_loss    the non-saturating generator loss
    hinge_loss        the hinge losses of critic and generator (Miyato et al. 2018, eq. 16-17)
    gradient_penalty  the WGAN-GP gradient penalty (Gulrajani et al. 2017, eq. 3)
    r1_penalty        R1 on real data (Mescheder et al. 2018, eq. 9)
    projection_head   the projection discriminator's output (Miyato & Koyama 2018, eq. 3)
    spectral_norm     sigma_max(W) by power iteration (Miyato et al. 2018, Algorithm 1)

Each check compares the student's code with the reference in :mod:`labs.gan` on fixed seeded inputs (while the
student's code runs, that reference raises, so calling it fails), recognises the usual wrong answers to say
precisely what to change, and otherwise gives a two-step :class:`~lab_utils.core.exercises.cases.Hint`. It returns a
:class:`~lab_utils.core.exercises.checks.CheckResult`: ``check_x(my_fn).pick(my_fn)`` is the student's function when it
passed and the lab's (with the student's signature) when not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.nn.utils.parametrizations as parametrizations
from torch import nn

from labs.gan.losses import (
    bce_critic_loss, bce_generator_loss, gradient_penalty, hinge_critic_loss, hinge_generator_loss, interpolate,
    r1_penalty, wasserstein_generator_loss,
)
from labs.gan.model import ProjectionHead, SpectralNormEstimate, power_iteration

from lab_utils.core.exercises.cases import Case, Hint
from lab_utils.core.exercises.checks import CheckResult, check_function, check_module
from lab_utils.core.exercises.records import case_seed, graded


def _randn(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=gen)


# --------------------------------------------------------------------------- 1. BCE critic loss
BCE_CRITIC_HINT = Hint(
    "the discriminator is a binary classifier on logits: real images are to be classified as real, fakes as "
    "fake; one-sided label smoothing lowers only the real images' target, a little below 1, and never touches "
    "the fakes' target",
    "two binary cross-entropy terms, each a mean over its own batch, added: the real scores against a target of "
    "1 minus the smoothing, the fake scores against a target of 0 (torch.full_like / torch.zeros_like make target "
    "tensors of the scores' shape); use the *with logits* BCE of torch.nn.functional, which stays finite for "
    "scores of +-40 where log(sigmoid(s)) computed by hand underflows",
)


def bce_critic_cases(seed: int = 0) -> list[Case]:
    gen = torch.Generator().manual_seed(case_seed(seed))
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


@graded("bce_critic_loss")
def check_bce_critic_loss(fn: Callable, name: str = "bce_critic_loss") -> CheckResult:
    """Check ``fn(real_scores, fake_scores, label_smoothing=0.0) -> scalar`` against
    :func:`labs.gan.bce_critic_loss`."""
    return check_function(fn, bce_critic_loss, bce_critic_cases(), name=name, hint=BCE_CRITIC_HINT,
                          known_mistakes=BCE_CRITIC_MISTAKES)


# --------------------------------------------------------------------------- 2. generator loss
GENERATOR_HINT = Hint(
    "the generator wants the discriminator to call its fakes real: it is scored with the same classification "
    "loss as the discriminator, on the fake scores only, with the target the discriminator gives real images "
    "(and no smoothing)",
    "one binary cross-entropy term on the fake scores (logits) with a target of ones of their shape, the *with "
    "logits* version, so that a score of -50 gives a finite loss near 50; this is the mean of -log D(G(z)), whose "
    "gradient is largest where the generator is worst",
)


def generator_cases(seed: int = 1) -> list[Case]:
    gen = torch.Generator().manual_seed(case_seed(seed))
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


@graded("generator_loss")
def check_generator_loss(fn: Callable, name: str = "non_saturating_generator_loss") -> CheckResult:
    """Check ``fn(fake_scores) -> scalar`` against the non-saturating loss :func:`labs.gan.bce_generator_loss`."""
    return check_function(fn, bce_generator_loss, generator_cases(), name=name, hint=GENERATOR_HINT,
                          known_mistakes=GENERATOR_MISTAKES)


# --------------------------------------------------------------------------- 3. hinge loss
class HingeLosses(NamedTuple):
    critic: torch.Tensor  # () E[max(0, 1 - D(x))] + E[max(0, 1 + D(G(z)))]
    generator: torch.Tensor  # () -E[D(G(z))]


def _reference_hinge(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> HingeLosses:
    """The lab's two hinge losses as the exercise's one function returns them."""
    return HingeLosses(hinge_critic_loss(real_scores, fake_scores), hinge_generator_loss(fake_scores))


HINGE_HINT = Hint(
    "each player has its own loss; the critic pays only for scores on the wrong side of a margin: a real image "
    "should score at least +1 and a fake at most -1, and a sample beyond its margin costs nothing; the generator "
    "has no margin: it just wants its fakes to score as high as possible",
    "critic: per real sample, how far its score falls short of +1 (zero when it is above), per fake sample, how "
    "far its score is above -1 (zero when it is below; F.relu gives the 'zero when'); average each over its own "
    "batch (the two batches may differ in size) and add the two averages. Generator: it minimises minus the "
    "fakes' mean score. Return the pair (critic loss, generator loss), each a 0-dim tensor",
)


def hinge_cases(seed: int = 4) -> list[Case]:
    gen = torch.Generator().manual_seed(case_seed(seed))
    return [
        Case((_randn(gen, 16, scale=2.0) + 1.5, _randn(gen, 16, scale=2.0) - 1.5),
             label="scores on both sides of the margins"),
        Case((_randn(gen, 12, scale=2.0) + 1.0, _randn(gen, 5, scale=2.0) - 1.0),
             label="12 real and 5 fake scores"),
        Case((torch.tensor([3.0, 1.5, 2.0]), torch.tensor([-2.0, -1.5, -4.0, -1.0])),
             label="every sample beyond its margin: the critic's loss is 0"),
        Case((torch.tensor([-3.0, 0.5]), torch.tensor([2.0, 0.0, 4.0])),
             label="a critic that is losing: every sample inside its margin"),
    ]


def _hinge_no_relu(real, fake):
    return HingeLosses((1 - real).mean() + (1 + fake).mean(), -fake.mean())


def _hinge_swapped(real, fake):
    return HingeLosses(F.relu(1 + real).mean() + F.relu(1 - fake).mean(), -fake.mean())


def _hinge_of_mean(real, fake):
    return HingeLosses(F.relu(1 - real.mean()) + F.relu(1 + fake.mean()), -fake.mean())


def _hinge_sums(real, fake):
    return HingeLosses(F.relu(1 - real).sum() + F.relu(1 + fake).sum(), -fake.mean())


def _hinge_generator_hinged(real, fake):
    return HingeLosses(hinge_critic_loss(real, fake), F.relu(1 - fake).mean())


def _hinge_generator_sign(real, fake):
    return HingeLosses(hinge_critic_loss(real, fake), fake.mean())


HINGE_MISTAKES: list[tuple[Callable, str]] = [
    (_hinge_no_relu, "the critic's loss matches mean(1 - D(x)) + mean(1 + D(G(z))), without the max(0, .): a "
                     "sample beyond its margin (a real scoring above +1, a fake below -1) must cost nothing"),
    (_hinge_swapped, "the critic's loss matches the hinge with real and fake swapped: real images should score "
                     "above +1 and fakes below -1, not the other way round"),
    (_hinge_of_mean, "the critic's loss matches max(0, 1 - mean D(x)) + max(0, 1 + mean D(G(z))): the hinge "
                     "applies to each sample's score, and only then comes the mean over the batch"),
    (_hinge_sums, "the critic's loss matches sums over the batch: take the mean of each term"),
    (_hinge_generator_hinged, "the generator's loss matches a hinge on the fakes, mean(max(0, 1 - D(G(z)))): in "
                              "Miyato et al. eq. 17 the generator minimises -mean D(G(z)), with no margin"),
    (_hinge_generator_sign, "the generator's loss has the wrong sign: it wants the fakes to score high, so it "
                            "minimises minus their mean score"),
]


@graded("hinge_loss")
def check_hinge_loss(fn: Callable, name: str = "hinge_loss") -> CheckResult:
    """Check ``fn(real_scores, fake_scores) -> (critic_loss, generator_loss)`` against
    :func:`labs.gan.hinge_critic_loss` and :func:`labs.gan.hinge_generator_loss`."""
    return check_function(fn, _reference_hinge, hinge_cases(), name=name, hint=HINGE_HINT,
                          known_mistakes=HINGE_MISTAKES,
                          forbid=(hinge_critic_loss, hinge_generator_loss, wasserstein_generator_loss))


# --------------------------------------------------------------------------- 4. gradient penalty
GP_HINT = Hint(
    "the penalty is taken at random points on the segments between each real sample and its fake, one mixing "
    "weight per sample; there it measures how far the length of the critic's gradient with respect to its input "
    "is from 1, and averages the squared gap over the batch; it must itself be differentiable with respect to "
    "the critic's weights, since it trains the critic",
    "eps has shape (B,): give it singleton dimensions so that it broadcasts over each sample's features; mark "
    "the interpolates as requiring grad, score them, and take torch.autograd.grad of the summed scores with "
    "respect to the interpolates, with create_graph=True; the gradient's L2 norm is per sample, over all its "
    "features (flatten from dim 1), not one norm for the whole batch; then the mean of the squared differences "
    "from 1",
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


def _small_critics(seed: int) -> tuple[SmallCritic, SmallCritic]:
    """A 2-D and a (3, 4, 4)-image critic with weights x3 (gradient norms well away from 1), without moving the
    global RNG."""
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(case_seed(seed))  # the small critics' initial weights
    small_2d, small_image = SmallCritic(2), SmallCritic(3 * 4 * 4)
    torch.random.set_rng_state(torch_state)
    with torch.no_grad():
        for critic in (small_2d, small_image):
            for param in critic.parameters():
                param.mul_(3.0)
    return small_2d, small_image


def gradient_penalty_cases(seed: int = 2) -> list[Case]:
    gen = torch.Generator().manual_seed(case_seed(seed))
    small_2d, small_image = _small_critics(seed)
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
    """Run ``fn(critic, ...)`` and also return d(penalty)/d(critic weights): that is what trains the critic."""

    def run(critic: nn.Module, *args: object, **kwargs: object) -> dict:
        penalty = fn(critic, *args, **kwargs)
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
    """The lab's gradient penalty with the exercise's signature: the scalar only."""
    return gradient_penalty(critic, real, fake, eps).penalty


def _input_gradient(critic, x):
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
    return grad


def _interpolates(real, fake, eps):
    eps = eps.view(-1, *[1] * (real.dim() - 1))
    return eps * real + (1 - eps) * fake


def _batch_norm(critic, real, fake, eps):
    return (_input_gradient(critic, _interpolates(real, fake, eps)).norm() - 1) ** 2


def _squared_norm(critic, real, fake, eps):
    grad = _input_gradient(critic, _interpolates(real, fake, eps))
    return ((grad.flatten(1).pow(2).sum(1) - 1) ** 2).mean()


def _one_sided(critic, real, fake, eps):
    grad = _input_gradient(critic, _interpolates(real, fake, eps))
    return (F.relu(grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def _at_real_points(critic, real, fake, eps):
    return gradient_penalty(critic, real, real, eps).penalty


def _eps_swapped(critic, real, fake, eps):
    return gradient_penalty(critic, fake, real, eps).penalty


GP_MISTAKES: list[tuple[Callable, str]] = [
    (_with_critic_gradient(_batch_norm), "it matches one norm over the whole batch: the norm is per sample "
                                         "(over each sample's features), then the mean of (norm - 1)^2"),
    (_with_critic_gradient(_squared_norm), "it matches (|grad|^2 - 1)^2: use the norm itself, not its square"),
    (_with_critic_gradient(_one_sided), "it matches the one-sided penalty max(0, |grad| - 1)^2: WGAN-GP "
                                        "penalises norms below 1 as well"),
    (_with_critic_gradient(_at_real_points), "it matches the penalty at the real points: take it at the "
                                             "interpolates x_hat = eps * real + (1 - eps) * fake"),
    (_with_critic_gradient(_eps_swapped), "it matches x_hat = eps * fake + (1 - eps) * real: eps multiplies "
                                          "the real points"),
]


@graded("gradient_penalty")
def check_gradient_penalty(fn: Callable, name: str = "gradient_penalty") -> CheckResult:
    """Check ``fn(critic, real, fake, eps) -> scalar`` against :func:`labs.gan.gradient_penalty`: the
    value, and its gradient with respect to the critic's weights (which needs ``create_graph=True``)."""
    return check_function(_with_critic_gradient(fn), _with_critic_gradient(_reference_penalty),
                          gradient_penalty_cases(), name=name, hint=GP_HINT, known_mistakes=GP_MISTAKES,
                          atol=1e-5, rtol=1e-4, forbid=(gradient_penalty, interpolate), fallback=_reference_penalty)


# --------------------------------------------------------------------------- 5. R1
R1_HINT = Hint(
    "R1 differentiates the critic's score with respect to its input at the *real* images only (no fakes, no "
    "interpolation) and penalises how steep the critic is there: the squared length of that gradient, one per "
    "image, averaged over the batch and weighted by gamma / 2; like the gradient penalty, it must itself be "
    "differentiable with respect to the critic's weights",
    "take a copy of the real batch that requires grad, score it, and take torch.autograd.grad of the summed "
    "scores with respect to that copy, with create_graph=True; per image, the sum of the squares of the "
    "gradient over all its features (flatten from dim 1: the squared norm, not the norm); the mean over the "
    "images; times half of gamma",
)


def r1_cases(seed: int = 5) -> list[Case]:
    gen = torch.Generator().manual_seed(case_seed(seed))
    small_2d, small_image = _small_critics(seed)
    return [
        Case((LinearCritic(torch.tensor([3.0, 4.0])), _randn(gen, 6, 2)), {"gamma": 10.0},
             label="linear critic with |w| = 5 (its input gradient is w everywhere), gamma = 10"),
        Case((small_2d, _randn(gen, 6, 2)), {"gamma": 1.0}, label="non-linear critic on 2-D points, gamma = 1"),
        Case((small_image, _randn(gen, 6, 3, 4, 4)), {"gamma": 0.5},
             label="non-linear critic on (B, 3, 4, 4) images, gamma = 0.5"),
    ]


def _reference_r1(critic, real, gamma):
    r"""$\frac{\gamma}{2}\,\mathbb E_x \lVert\nabla_x D(x)\rVert_2^2$ with the lab's :func:`labs.gan.r1_penalty`."""
    return gamma / 2 * r1_penalty(critic, real)


def _r1_no_half(critic, real, gamma):
    return gamma * r1_penalty(critic, real)


def _r1_no_gamma(critic, real, gamma):
    return r1_penalty(critic, real) / 2


def _r1_norm(critic, real, gamma):
    return gamma / 2 * _input_gradient(critic, real).flatten(1).norm(dim=1).mean()


def _r1_sum(critic, real, gamma):
    return gamma / 2 * _input_gradient(critic, real).flatten(1).pow(2).sum()


def _r1_towards_one(critic, real, gamma):
    return gamma / 2 * ((_input_gradient(critic, real).flatten(1).norm(dim=1) - 1) ** 2).mean()


R1_MISTAKES: list[tuple[Callable, str]] = [
    (_with_critic_gradient(_r1_no_half), "it matches gamma * E||grad||^2: R1 is gamma / 2 times the mean squared "
                                         "norm (Mescheder et al. eq. 9)"),
    (_with_critic_gradient(_r1_no_gamma), "it matches E||grad||^2 / 2, without gamma: the weight is gamma / 2"),
    (_with_critic_gradient(_r1_norm), "it matches the mean of the gradient's norm: R1 penalises its *square*"),
    (_with_critic_gradient(_r1_sum), "it matches the sum over the batch: take the mean over the real images"),
    (_with_critic_gradient(_r1_towards_one), "it matches (|grad| - 1)^2, the WGAN-GP form: R1 pulls the gradient "
                                             "at real points towards 0, so it penalises the squared norm itself"),
]


@graded("r1_penalty")
def check_r1_penalty(fn: Callable, name: str = "r1_penalty") -> CheckResult:
    r"""Check ``fn(critic, real, gamma) -> scalar``, $\frac{\gamma}{2}\mathbb E\lVert\nabla_x D(x)\rVert^2$, against
    :func:`labs.gan.r1_penalty`: the value and its gradient with respect to the critic's weights."""
    return check_function(_with_critic_gradient(fn), _with_critic_gradient(_reference_r1), r1_cases(), name=name,
                          hint=R1_HINT, known_mistakes=R1_MISTAKES, forbid=(r1_penalty, gradient_penalty),
                          fallback=_reference_r1)


# --------------------------------------------------------------------------- 6. projection head
PROJECTION_HINT = Hint(
    "the score is the sum of two parts: a realism score from the features alone (a linear layer down to one "
    "number), and a match score, the per-sample inner product between the features and a linear map of the "
    "condition (a map with no bias, so that a zero condition adds nothing)",
    "in __init__, psi is a linear layer from feature_dim to 1 and embed a linear layer from cond_dim to "
    "feature_dim without a bias (the check loads the reference's weights, so the names and shapes must be "
    "these); in forward, drop psi's last dimension of size 1 to get shape (B,), and add the inner product of "
    "embed(y) with the features, one per sample (an elementwise product summed over the feature dimension)",
)


def projection_cases(seed: int = 3) -> tuple[Case, list[Case]]:
    gen = torch.Generator().manual_seed(case_seed(seed))
    init = Case((12, 5), label="feature_dim=12, cond_dim=5")
    cases = [
        Case((_randn(gen, 4, 12), _randn(gen, 4, 5)), label="4 images"),
        Case((_randn(gen, 1, 12, scale=3.0), _randn(gen, 1, 5)), label="one image"),
        Case((_randn(gen, 3, 12), torch.zeros(3, 5)), label="zero condition: only psi(phi(x)) remains"),
    ]
    return init, cases


@graded("projection_head")
def check_projection_head(cls: Callable[..., nn.Module], name: str = "ProjectionHead") -> CheckResult:
    """Check a student's ``cls(feature_dim, cond_dim)`` layer, ``forward(features, y) -> (B,)``,
    against :class:`labs.gan.ProjectionHead` (same parameter names: ``psi``, ``embed``)."""
    init, cases = projection_cases()
    return check_module(cls, ProjectionHead, init, cases, name=name, hint=PROJECTION_HINT)


# --------------------------------------------------------------------------- 7. spectral norm
SPECTRAL_HINT = Hint(
    "power iteration: map a unit vector through W transposed and then through W, rescaling it to unit length "
    "after each product; repeated, u and v turn towards the top left and right singular vectors, and W v then "
    "has length sigma_max; sigma is estimated from u, W and v, not from an SVD",
    "each of the n_iterations rounds: v is W-transposed times u, divided by its L2 norm; then u is W times "
    "that v, divided by its norm (v lives in the input space, of size W.shape[1]; u in the output space); after "
    "the loop sigma is the scalar u^T (W v), a 0-dim tensor: return it with the new u, which a training step keeps "
    "for the next one",
)


def spectral_norm_cases(seed: int = 6) -> list[Case]:
    gen = torch.Generator().manual_seed(case_seed(seed))
    return [
        Case((_randn(gen, 4, 4), _randn(gen, 4), 1), label="a square 4x4 W, one iteration"),
        Case((_randn(gen, 6, 4), _randn(gen, 6), 3), label="a 6x4 W (a Linear(4, 6) layer's weight), 3 iterations"),
        Case((_randn(gen, 8, 3 * 3 * 3, scale=0.2), _randn(gen, 8, scale=5.0), 2),
             label="a conv weight (8, 3, 3, 3) as an 8x27 matrix, a u that is not of unit length, 2 iterations"),
        Case((_randn(gen, 5, 3, scale=10.0), _randn(gen, 5), 60), label="60 iterations: sigma is sigma_max"),
    ]


def _spectral_w_not_transposed(W, u, n_iterations):
    for _ in range(n_iterations):
        v = F.normalize(W @ u, dim=0)  # W u instead of W^T u (square W only)
        u = F.normalize(W @ v, dim=0)
    return SpectralNormEstimate(u @ W @ v, u)


def _spectral_not_normalised(W, u, n_iterations):
    for _ in range(n_iterations):
        v = W.t() @ u
        u = W @ v
    return SpectralNormEstimate(u @ W @ v, u)


def _spectral_squared(W, u, n_iterations):
    estimate = power_iteration(W, u, n_iterations)
    return SpectralNormEstimate(estimate.sigma ** 2, estimate.u)


def _spectral_one_iteration(W, u, n_iterations):
    return power_iteration(W, u, 1)


def _spectral_returns_v(W, u, n_iterations):
    for _ in range(n_iterations):
        v = F.normalize(W.t() @ u, dim=0)
        u = F.normalize(W @ v, dim=0)
    return SpectralNormEstimate(u @ W @ v, v)


SPECTRAL_MISTAKES: list[tuple[Callable, str]] = [
    (_spectral_w_not_transposed, "it matches v = W u / |W u|: the v update multiplies by W *transposed* (u lives "
                                 "in W's output space, v in its input space)"),
    (_spectral_not_normalised, "it matches the iteration without normalisation: divide v and u by their L2 norms "
                               "after each product, or their lengths (and your sigma) grow with every round"),
    (_spectral_squared, "it matches sigma^2: with unit vectors u and v, u^T W v is sigma itself"),
    (_spectral_one_iteration, "it matches a single iteration: repeat the two updates n_iterations times"),
    (_spectral_returns_v, "the second output matches v: return u, the vector in W's output space"),
]


def _spectral_forbid() -> tuple:
    """The lab's power iteration and torch's spectral norm (the parametrization, its power method, the old API)."""
    targets: list = [power_iteration, parametrizations.spectral_norm, torch.nn.utils.spectral_norm]
    power_method = getattr(getattr(parametrizations, "_SpectralNorm", None), "_power_method", None)
    if power_method is not None:
        targets.append(power_method)
    return tuple(targets)


@graded("spectral_norm")
def check_spectral_norm(fn: Callable, name: str = "spectral_norm") -> CheckResult:
    """Check ``fn(W, u, n_iterations) -> (sigma, u)`` (W: (out, in), u: (out,)) against
    :func:`labs.gan.model.power_iteration`, whose u is torch's spectral_norm's (tested)."""
    return check_function(fn, power_iteration, spectral_norm_cases(), name=name, hint=SPECTRAL_HINT,
                          known_mistakes=SPECTRAL_MISTAKES, forbid=_spectral_forbid())
