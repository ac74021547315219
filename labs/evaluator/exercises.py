"""Checks for the evaluation exercises (notebook 05): the Fréchet distance, KID's unbiased estimator, the Inception
Score and improved precision/recall.

Each is compared with the lab's own metric (:mod:`lab_utils.core.metrics`); while the student's code runs,
the lab's metric functions (and torchmetrics' KID and IS, which compute the same numbers) raise, so an answer that
calls them fails.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from lab_utils.core.metrics import (
    frechet_distance, gaussian_stats, inception_score, kid, kid_unbiased, knn_radii, manifold_coverage,
    polynomial_kernel, precision_recall,
)

from lab_utils.core.exercises.cases import Case, Hint
from lab_utils.core.exercises.checks import CheckResult, check_function
from lab_utils.core.exercises.records import case_seed, graded


def _mixing(gen: torch.Generator, dim: int) -> torch.Tensor:
    return torch.randn(dim, dim, generator=gen, dtype=torch.float64) / dim**0.5  # (F, F)


def _features(gen: torch.Generator, n: int, dim: int, shift: float = 0.0, scale: float = 1.0,
              mixing: torch.Tensor | None = None) -> torch.Tensor:
    """(n, dim) correlated float64 features: shift + scale * z @ mixing (a fresh mixing unless one is given)."""
    mixing = _mixing(gen, dim) if mixing is None else mixing
    return shift + scale * torch.randn(n, dim, generator=gen, dtype=torch.float64) @ mixing


def _as_float64(*values) -> list[torch.Tensor]:
    return [torch.as_tensor(value, dtype=torch.float64) for value in values]


# --------------------------------------------------------------------------- the Fréchet distance

FRECHET_HINT = Hint(
    "The distance has a part for the means (how far apart the two centres are, squared) and a part for the "
    "covariances (both traces, minus twice the trace of the square root of their product). The product of two "
    "covariances is not symmetric, so do not take its square root directly: a symmetric matrix has the same "
    "eigenvalues.",
    "Work in float64. Take the symmetric square root of Sigma_1 from its eigendecomposition (the eigenvectors, the "
    "square roots of the eigenvalues clamped at zero, the eigenvectors transposed); sandwich Sigma_2 between two "
    "copies of it; the trace you need is the sum of the square roots of that matrix's eigenvalues (eigvalsh, clamped "
    "at zero). Return a Python float.",
)


def frechet_cases(seed: int = 0) -> list[Case]:
    gen = torch.Generator().manual_seed(case_seed(seed))
    a, b = _features(gen, 200, 6), _features(gen, 150, 6, shift=0.5, scale=1.5)
    same = gaussian_stats(a)
    cases = [
        Case((*same, *same), label="a distribution against itself (d = 0)"),
        Case((*gaussian_stats(a), *gaussian_stats(b)), label="shifted and scaled features"),
        Case((torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64),
              torch.ones(3, dtype=torch.float64), 4 * torch.eye(3, dtype=torch.float64)),
             label="N(0, I) vs N(1, 4I) in 3-D: 3 + 3 + 12 - 2*6 = 6"),
    ]
    return cases


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    eigvals, eigvecs = torch.linalg.eigh(matrix)
    return eigvecs @ torch.diag(eigvals.clamp(min=0).sqrt()) @ eigvecs.T


def _trace_sqrt_product(sigma1: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    root = _sqrtm_psd(sigma1)
    m = root @ sigma2 @ root
    return torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()


def _fd_mean_not_squared(mu1, sigma1, mu2, sigma2):
    mu1, sigma1, mu2, sigma2 = _as_float64(mu1, sigma1, mu2, sigma2)
    return float((mu1 - mu2).norm() + sigma1.trace() + sigma2.trace() - 2 * _trace_sqrt_product(sigma1, sigma2))


def _fd_no_factor_two(mu1, sigma1, mu2, sigma2):
    mu1, sigma1, mu2, sigma2 = _as_float64(mu1, sigma1, mu2, sigma2)
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - _trace_sqrt_product(sigma1, sigma2))


def _fd_sqrt_of_trace(mu1, sigma1, mu2, sigma2):
    mu1, sigma1, mu2, sigma2 = _as_float64(mu1, sigma1, mu2, sigma2)
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace()
                 - 2 * (sigma1 @ sigma2).trace().clamp(min=0).sqrt())


def _fd_separate_roots(mu1, sigma1, mu2, sigma2):
    mu1, sigma1, mu2, sigma2 = _as_float64(mu1, sigma1, mu2, sigma2)
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace()
                 - 2 * (_sqrtm_psd(sigma1) @ _sqrtm_psd(sigma2)).trace())


FRECHET_MISTAKES: list[tuple[Callable, str]] = [
    (_fd_mean_not_squared, "it matches the distance between the means, not its square — the mean term is the "
                           "squared norm of their difference"),
    (_fd_no_factor_two, "it matches the trace of the square root subtracted once — it is subtracted twice"),
    (_fd_sqrt_of_trace, "it matches the square root of the trace of the product — you need the trace of the "
                        "product's matrix square root (the sum of the square roots of its eigenvalues)"),
    (_fd_separate_roots, "it matches the trace of Sigma_1^(1/2) Sigma_2^(1/2) — that is right only when the two "
                         "covariances commute: take the square root of the product (through the symmetric "
                         "Sigma_1^(1/2) Sigma_2 Sigma_1^(1/2))"),
]


@graded("frechet_distance")
def check_frechet_distance(fn: Callable, name: str = "frechet_distance") -> CheckResult:
    """``fn(mu1, sigma1, mu2, sigma2) -> float``, checked against ``lab_utils.commands.evaluation.frechet_distance``."""
    return check_function(fn, frechet_distance, frechet_cases(), name=name, hint=FRECHET_HINT, atol=1e-6, rtol=1e-5,
                          known_mistakes=FRECHET_MISTAKES)


# --------------------------------------------------------------------------- KID

KID_HINT = Hint(
    "KID compares the average kernel similarity within each set with the average similarity across the two sets. "
    "It is unbiased because no point is ever compared with itself: the diagonals of the within-set kernel "
    "matrices are left out.",
    "With d the feature size, the kernel of two feature vectors is (their dot product divided by d, plus 1) cubed. "
    "Compute the three kernel matrices (x with x, y with y, x with y); average each within-set matrix over its "
    "m(m - 1) off-diagonal entries (its sum minus its trace), average the cross matrix over all its entries, and "
    "combine: within x, plus within y, minus twice across. Work in float64 and return a float.",
)


def kid_cases(seed: int = 0) -> list[Case]:
    gen = torch.Generator().manual_seed(case_seed(seed))
    mixing = _mixing(gen, 5)
    return [
        Case((_features(gen, 40, 5, mixing=mixing), _features(gen, 50, 5, mixing=mixing)),
             label="two samples of one distribution (about 0)"),
        Case((_features(gen, 40, 5, mixing=mixing), _features(gen, 30, 5, shift=1.0, mixing=mixing)),
             label="shifted features (positive)"),
    ]


def _kernels(f1, f2, scale: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = _as_float64(f1, f2)
    d = x.shape[1] if scale else 1
    return (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3


def _off_diagonal_mean(k: torch.Tensor) -> torch.Tensor:
    return (k.sum() - k.diagonal().sum()) / (len(k) * (len(k) - 1))


def _kid_biased(f1, f2):
    k_xx, k_yy, k_xy = _kernels(f1, f2)
    return float(k_xx.mean() + k_yy.mean() - 2 * k_xy.mean())


def _kid_kernel_not_scaled(f1, f2):
    k_xx, k_yy, k_xy = _kernels(f1, f2, scale=False)
    return float(_off_diagonal_mean(k_xx) + _off_diagonal_mean(k_yy) - 2 * k_xy.mean())


def _kid_cross_term_once(f1, f2):
    k_xx, k_yy, k_xy = _kernels(f1, f2)
    return float(_off_diagonal_mean(k_xx) + _off_diagonal_mean(k_yy) - k_xy.mean())


KID_MISTAKES: list[tuple[Callable, str]] = [
    (_kid_biased, "it matches the biased estimate, with every point also compared with itself — leave the "
                  "diagonals of the within-set kernel matrices out (and divide by m(m - 1))"),
    (_kid_kernel_not_scaled, "it matches a kernel without the 1/d — divide the dot products by the feature size "
                             "before adding 1"),
    (_kid_cross_term_once, "it matches the cross-set term subtracted once — it is subtracted twice"),
]


@graded("kid")
def check_kid(fn: Callable, name: str = "kid_unbiased") -> CheckResult:
    """``fn(f1, f2) -> float`` (unbiased MMD^2, cubic polynomial kernel), checked against ``kid_unbiased``."""
    return check_function(fn, kid_unbiased, kid_cases(), name=name, hint=KID_HINT, atol=1e-8, rtol=1e-6,
                          known_mistakes=KID_MISTAKES,
                          forbid=(kid_unbiased, polynomial_kernel, kid, (KernelInceptionDistance, "compute")))


# --------------------------------------------------------------------------- the Inception Score

INCEPTION_SCORE_HINT = Hint(
    "A good generator's images are each classified confidently (a sharp p(y|x)) and, together, cover every class "
    "(a broad marginal p(y)). The score is the average, over the images, of how far each image's prediction is "
    "from the marginal, measured by a KL divergence, with the logarithm undone at the end.",
    "The marginal p(y) is the mean of the rows of probs. For each row, KL(p(y|x) || p(y)) is the sum over the "
    "classes of p(y|x) times (log p(y|x) minus log p(y)); average it over the rows; the score is the exponential "
    "of that average: a float between 1 and the number of classes. Work in float64.",
)


def inception_score_cases(seed: int = 0) -> list[Case]:
    """(N, K) class probabilities, every entry positive (softmaxes of logits)."""
    gen = torch.Generator().manual_seed(case_seed(seed))

    def probs(logits: torch.Tensor) -> torch.Tensor:
        return logits.double().softmax(dim=1)

    one_hot = torch.nn.functional.one_hot(torch.arange(5).repeat(8), 5).double()  # (40, 5), balanced
    return [
        Case((probs(2.0 * torch.randn(60, 7, generator=gen)),), label="60 images, 7 classes"),
        Case((probs(6.0 * one_hot + torch.randn(40, 5, generator=gen)),),
             label="confident and balanced over 5 classes (close to 5)"),
        Case((probs(torch.randn(1, 6, generator=gen)).repeat(30, 1),),
             label="every image gets the same prediction (exactly 1)"),
        Case((probs(4.0 * torch.randn(25, 4, generator=gen) + torch.tensor([3.0, 0.0, 0.0, 0.0])),),
             label="most images in class 0"),
    ]


def lab_inception_score(probs: torch.Tensor) -> float:
    """The lab's Inception Score (:func:`~lab_utils.commands.evaluation.inception_score`, one split) of (N, K)
    probabilities."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*degrees of freedom.*")  # the std of a single split
        return inception_score(torch.as_tensor(probs, dtype=torch.float64).log(), splits=1)[0]


def _kl_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p_i || q_i) for every row: (N, K), (N, K) or (K,) -> (N,)."""
    return (p * (p.log() - q.log())).sum(dim=1)


def _is_without_exp(probs):
    (p,) = _as_float64(probs)
    return float(_kl_rows(p, p.mean(0, keepdim=True)).mean())


def _is_reversed_kl(probs):
    (p,) = _as_float64(probs)
    marginal = p.mean(0, keepdim=True).expand_as(p)
    return float(_kl_rows(marginal, p).mean().exp())


def _is_uniform_marginal(probs):
    (p,) = _as_float64(probs)
    return float(_kl_rows(p, torch.full_like(p, 1.0 / p.shape[1])).mean().exp())


def _is_mean_of_exp(probs):
    (p,) = _as_float64(probs)
    return float(_kl_rows(p, p.mean(0, keepdim=True)).exp().mean())


INCEPTION_SCORE_MISTAKES: list[tuple[Callable, str]] = [
    (_is_without_exp, "it matches the mean KL divergence itself — the score is its exponential"),
    (_is_reversed_kl, "it matches the KL divergence the wrong way round, from the marginal to each prediction — "
                      "it is KL(p(y|x) || p(y)): each image's prediction first, weighted by its own probabilities"),
    (_is_uniform_marginal, "it matches a KL divergence to the uniform distribution — p(y) is the marginal, the mean "
                           "of the predictions over all images"),
    (_is_mean_of_exp, "it matches the mean of the exponentials — take the exponential of the mean KL divergence, "
                      "not the mean of each image's exponential"),
]


@graded("inception_score")
def check_inception_score(fn: Callable, name: str = "inception_score") -> CheckResult:
    """``fn(probs) -> float``, the IS of (N, K) class probabilities, checked against the lab's
    :func:`~lab_utils.commands.evaluation.inception_score` (one split)."""
    return check_function(fn, lab_inception_score, inception_score_cases(), name=name, hint=INCEPTION_SCORE_HINT,
                          atol=1e-8, rtol=1e-6, known_mistakes=INCEPTION_SCORE_MISTAKES,
                          forbid=(lab_inception_score, inception_score, (InceptionScore, "compute")))


# --------------------------------------------------------------------------- precision and recall

PRECISION_RECALL_HINT = Hint(
    "Each set spans a 'manifold': the union of balls around its points, each ball as wide as the distance from its "
    "point to that point's k-th nearest neighbour in the same set. Precision asks which share of the generated "
    "samples falls inside the real manifold; recall asks the same of the real samples and the generated manifold.",
    "A point's radius is the distance to its k-th nearest *other* point of its own set (in a row of pairwise "
    "distances, torch.cdist, the smallest is the point itself, at 0: skip it). A query lies inside a set's "
    "manifold when its distance to at least one point of that set is at most that point's radius. Precision: the "
    "share of fake points inside the real manifold; recall: the share of real points inside the fake manifold. "
    "Return the two as floats, precision first.",
)


def precision_recall_cases(seed: int = 0) -> list[Case]:
    gen = torch.Generator().manual_seed(case_seed(seed))
    line = torch.arange(10, dtype=torch.float64)[:, None]  # 0, 1, ..., 9: every 1-NN radius is 1
    cloud = _features(gen, 40, 3)
    space = _mixing(gen, 4)
    real = torch.randn(60, 2, generator=gen, dtype=torch.float64)
    narrow = 0.3 + 0.4 * torch.randn(40, 2, generator=gen, dtype=torch.float64)  # inside the real cloud, less spread
    return [
        Case((real, narrow), {"k": 3}, label="a narrower fake set inside the real one, k = 3"),
        Case((_features(gen, 50, 4, mixing=space), _features(gen, 45, 4, shift=1.0, scale=1.5, mixing=space)),
             {"k": 5}, label="a wider, shifted fake set, k = 5"),
        Case((line, torch.tensor([[0.5], [20.0]], dtype=torch.float64)), {"k": 1},
             label="real 0, 1, ..., 9 and fake 0.5 and 20, k = 1: (0.5, 1.0)"),
        Case((cloud, cloud.clone()), {"k": 3}, label="the same points twice: (1.0, 1.0)"),
    ]


def lab_precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """The lab's :func:`~lab_utils.commands.evaluation.precision_recall` as ``(precision, recall)``."""
    result = precision_recall(real, fake, k=k)
    return result.precision, result.recall


def _coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor) -> float:
    return float((torch.cdist(queries, support) <= radii[None, :]).any(dim=1).double().mean())


def _radii(points: torch.Tensor, k: int, skip_self: bool = True) -> torch.Tensor:
    return torch.cdist(points, points).kthvalue(k + 1 if skip_self else k, dim=1).values


def _pr_swapped(real, fake, k=3):
    real, fake = _as_float64(real, fake)
    return _coverage(real, fake, _radii(fake, k)), _coverage(fake, real, _radii(real, k))


def _pr_radius_counts_itself(real, fake, k=3):
    real, fake = _as_float64(real, fake)
    return (_coverage(fake, real, _radii(real, k, skip_self=False)),
            _coverage(real, fake, _radii(fake, k, skip_self=False)))


def _pr_query_radii(real, fake, k=3):
    """Each query's own k-NN radius (in its own set) instead of the radii of the set it is compared with."""
    real, fake = _as_float64(real, fake)
    fake_radii, real_radii = _radii(fake, k), _radii(real, k)
    precision = (torch.cdist(fake, real) <= fake_radii[:, None]).any(dim=1).double().mean()
    recall = (torch.cdist(real, fake) <= real_radii[:, None]).any(dim=1).double().mean()
    return float(precision), float(recall)


PRECISION_RECALL_MISTAKES: list[tuple[Callable, str]] = [
    (_pr_swapped, "it matches precision and recall swapped — precision is the share of *fake* samples inside the "
                  "*real* manifold, and it comes first"),
    (_pr_radius_counts_itself, "it matches radii that count the point itself as its nearest neighbour — the "
                               "radius is the distance to the k-th nearest *other* point"),
    (_pr_query_radii, "it matches balls around the queries — the balls belong to the set a query is compared "
                      "with: a fake sample is counted when it lies within some real point's radius"),
]


@graded("precision_recall")
def check_precision_recall(fn: Callable, name: str = "precision_recall") -> CheckResult:
    """``fn(real, fake, k) -> (precision, recall)``, checked against the lab's
    :func:`~lab_utils.commands.evaluation.precision_recall`."""
    return check_function(fn, lab_precision_recall, precision_recall_cases(), name=name,
                          hint=PRECISION_RECALL_HINT, known_mistakes=PRECISION_RECALL_MISTAKES,
                          forbid=(lab_precision_recall, precision_recall, knn_radii, manifold_coverage))
