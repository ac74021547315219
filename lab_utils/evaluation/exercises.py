"""Checks for the evaluation exercises (notebook 05): the Frechet distance and KID's unbiased estimator."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lab_utils.evaluation.metrics import frechet_distance, gaussian_stats, kid_unbiased

from lab_utils.exercises import Case, check_function

FRECHET_HINT = (
    "d^2 = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)); Tr((S1 S2)^(1/2)) is the sum of the square "
    "roots of the eigenvalues of S1^(1/2) S2 S1^(1/2) (symmetric, so torch.linalg.eigvalsh works); use float64"
)
KID_HINT = (
    "with k(x, y) = (x.y / d + 1)^3: mean of k over pairs i != j within f1, plus the same within f2, "
    "minus 2 x the mean of k over all pairs across f1 and f2 (the diagonal of the within-set kernels is left out)"
)


def _features(gen: torch.Generator, n: int, dim: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    mixing = torch.randn(dim, dim, generator=gen, dtype=torch.float64) / dim**0.5
    return shift + scale * torch.randn(n, dim, generator=gen, dtype=torch.float64) @ mixing  # correlated features


def frechet_cases(seed: int = 0) -> list[Case]:
    gen = torch.Generator().manual_seed(seed)
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


def kid_cases(seed: int = 0) -> list[Case]:
    gen = torch.Generator().manual_seed(seed)
    return [
        Case((_features(gen, 40, 5), _features(gen, 50, 5)), label="two samples of one distribution (about 0)"),
        Case((_features(gen, 40, 5), _features(gen, 30, 5, shift=1.0)), label="shifted features (positive)"),
    ]


def check_frechet_distance(fn: Callable, name: str = "frechet_distance") -> bool:
    """``fn(mu1, sigma1, mu2, sigma2) -> float``, checked against ``lab_utils.evaluation.frechet_distance``."""
    return check_function(fn, frechet_distance, frechet_cases(), name=name, hint=FRECHET_HINT, atol=1e-6, rtol=1e-5)


def check_kid(fn: Callable, name: str = "kid_unbiased") -> bool:
    """``fn(f1, f2) -> float`` (unbiased MMD^2, cubic polynomial kernel), checked against ``kid_unbiased``."""
    return check_function(fn, kid_unbiased, kid_cases(), name=name, hint=KID_HINT, atol=1e-8, rtol=1e-6)
