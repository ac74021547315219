"""Sample-quality metrics on *features*, so each image set is embedded once and reused.

    FID        Heusel et al. 2017, eq. (6):  $\\|\\mu_1-\\mu_2\\|^2 + \\mathrm{Tr}(\\Sigma_1+\\Sigma_2-2(\\Sigma_1\\Sigma_2)^{1/2})$
               (float64; with fewer samples than dimensions, from an n x n SVD: same value, faster)
    KID        Binkowski et al. 2018, eq. (4): unbiased $\\mathrm{MMD}^2$ with the kernel $k(x,y)=(x^\\top y/d+1)^3$
    IS         Salimans et al. 2016, sec. 4:   $\\exp\\big(\\mathbb{E}_x\\,\\mathrm{KL}(p(y|x)\\,\\|\\,p(y))\\big)$
    precision  Kynkaanniemi et al. 2019, eq. (1)-(3): the share of one set inside the other's k-NN manifold
    recall
    alignment  did the generated image show what the prompt asked for (the evaluator's reading of it)?

FID, KID and IS are computed by torchmetrics, whose metrics call a feature network in
``update``; :class:`Passthrough` is a "network" that returns its input, so precomputed
features go straight in. :func:`frechet_distance` and :func:`kid_unbiased` write the same
equations out (the notebooks' exercises are checked against them; the tests check them
against torchmetrics and scipy).

torchmetrics' KID and IS draw ``torch.randperm`` from the *global* RNG in ``compute()``;
every computation here runs under :func:`seeded`, a forked RNG with a fixed seed, so results
are reproducible and a training run that evaluates along the way keeps its own RNG stream.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn


def psnr(mse: torch.Tensor | float, data_range: float = 2.0) -> torch.Tensor:
    r"""Peak signal-to-noise ratio in dB, $10 \log_{10}(R^2 / \mathrm{MSE})$, for images spanning ``data_range``
    (2 for [-1, 1])."""
    mse = torch.as_tensor(mse, dtype=torch.float32)
    return 10.0 * torch.log10(data_range ** 2 / mse.clamp_min(1e-12))


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with the CPU global RNG seeded by ``seed``; the caller's RNG state is restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class Passthrough(nn.Module):
    """The identity, dressed as a torchmetrics feature extractor: ``update(features)`` stores the features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features  # torchmetrics reads this instead of probing with a dummy image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torchmetrics warns that KID/IS keep every feature in memory: they are ours already."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
        yield


# ------------------------------------------------------------------------------------ FID
def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (F,) and unbiased covariance (F, F) of (N, F) features, in float64."""
    x = torch.as_tensor(features, dtype=torch.float64)
    mu = x.mean(dim=0)  # mu
    centred = x - mu  # (N, F)
    sigma = centred.T @ centred / (len(x) - 1)  # Sigma, (F, F)
    return mu, sigma


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Squared Frechet distance between N(mu1, Sigma1) and N(mu2, Sigma2) (Heusel et al. 2017, eq. 6).

    $d^2 = \\|\\mu_1-\\mu_2\\|^2 + \\mathrm{Tr}(\\Sigma_1) + \\mathrm{Tr}(\\Sigma_2) - 2\\,\\mathrm{Tr}\\big((\\Sigma_1\\Sigma_2)^{1/2}\\big)$

    $\\Sigma_1\\Sigma_2$ is not symmetric, but it is similar to the symmetric PSD matrix
    $M = \\Sigma_1^{1/2}\\Sigma_2\\Sigma_1^{1/2}$, so $\\mathrm{Tr}((\\Sigma_1\\Sigma_2)^{1/2}) = \\sum_i \\sqrt{\\lambda_i(M)}$,
    computed with symmetric eigendecompositions only (stable, float64).
    """
    mu1, mu2 = (torch.as_tensor(v, dtype=torch.float64) for v in (mu1, mu2))
    sigma1, sigma2 = (torch.as_tensor(v, dtype=torch.float64) for v in (sigma1, sigma2))
    mean_term = (mu1 - mu2).square().sum()  # ||mu_1 - mu_2||^2
    eigvals, eigvecs = torch.linalg.eigh(sigma1)
    sqrt_sigma1 = eigvecs @ torch.diag(eigvals.clamp(min=0).sqrt()) @ eigvecs.T  # Sigma_1^{1/2}
    m = sqrt_sigma1 @ sigma2 @ sqrt_sigma1  # M = Sigma_1^{1/2} Sigma_2 Sigma_1^{1/2}
    trace_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()  # Tr((Sigma_1 Sigma_2)^{1/2})
    return float(mean_term + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt)


def frechet_distance_low_rank(x: Any, y: Any) -> float:
    r"""The same squared Frechet distance, from the features, for fewer samples than dimensions.

    With centred features $A_1$ (n_1, F) and $A_2$ (n_2, F), $\Sigma_i = A_i^\top A_i/(n_i-1)$. The non-zero
    eigenvalues of $\Sigma_1\Sigma_2$ are those of $BB^\top/((n_1-1)(n_2-1))$ with $B = A_1A_2^\top$ (n_1, n_2),
    so $\mathrm{Tr}((\Sigma_1\Sigma_2)^{1/2}) = \|A_1A_2^\top\|_* / \sqrt{(n_1-1)(n_2-1)}$ (the nuclear norm, the
    sum of singular values) and $\mathrm{Tr}\,\Sigma_i = \|A_i\|_F^2/(n_i-1)$: an n x n problem instead of F x F
    (Inception's F = 2048 at n = 1000: one 1000 x 1000 SVD instead of a 2048 x 2048 eigenproblem).
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    y = torch.as_tensor(y, dtype=torch.float64)
    mu1, mu2 = x.mean(0), y.mean(0)
    a1, a2 = x - mu1, y - mu2  # centred, (n_1, F) and (n_2, F)
    n1, n2 = len(x) - 1, len(y) - 1
    trace_sqrt = torch.linalg.svdvals(a1 @ a2.T).sum() / math.sqrt(n1 * n2)  # Tr((Sigma_1 Sigma_2)^{1/2})
    trace1, trace2 = a1.square().sum() / n1, a2.square().sum() / n2  # Tr(Sigma_1), Tr(Sigma_2)
    return float((mu1 - mu2).square().sum() + trace1 + trace2 - 2 * trace_sqrt)


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between (N, F) and (M, F) features, in float64.

    By torchmetrics' FrechetInceptionDistance when both sets have more samples than dimensions
    (the evaluator's features); otherwise the covariances are rank-deficient and
    :func:`frechet_distance_low_rank` gives the same number far faster.
    """
    if min(len(real), len(fake)) <= real.shape[1]:
        return frechet_distance_low_rank(real, fake)
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=Passthrough(real.shape[1]), normalize=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


# ------------------------------------------------------------------------------------ KID
def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = 3, coef: float = 1.0) -> torch.Tensor:
    """$k(x, y) = (x^\\top y / d + c)^{\\text{degree}}$ for every pair: (N, F), (M, F) -> (N, M)."""
    return (x @ y.T / x.shape[1] + coef) ** degree


def kid_unbiased(f1: Any, f2: Any, degree: int = 3, coef: float = 1.0) -> float:
    """Unbiased $\\mathrm{MMD}^2$ between two feature sets (Binkowski et al. 2018, eq. 4 with m = n).

    $\\widehat{\\mathrm{MMD}}^2 = \\frac{1}{m(m-1)}\\sum_{i \\ne j} k(x_i,x_j) + \\frac{1}{n(n-1)}\\sum_{i \\ne j} k(y_i,y_j)
    - \\frac{2}{mn}\\sum_{i,j} k(x_i,y_j)$, with the kernel :func:`polynomial_kernel`.
    """
    x = torch.as_tensor(f1, dtype=torch.float64)
    y = torch.as_tensor(f2, dtype=torch.float64)
    m, n = len(x), len(y)
    k_xx = polynomial_kernel(x, x, degree, coef)  # (m, m)
    k_yy = polynomial_kernel(y, y, degree, coef)  # (n, n)
    k_xy = polynomial_kernel(x, y, degree, coef)  # (m, n)
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))  # i != j
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


def kid(real: torch.Tensor, fake: torch.Tensor, subset_size: int = 1000, subsets: int = 100,
        seed: int = 0) -> tuple[float, float]:
    """KID mean and std over ``subsets`` random subsets of ``subset_size`` (capped at the set sizes),
    by torchmetrics."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real), len(fake))
    with _quiet():
        metric = KernelInceptionDistance(feature=Passthrough(real.shape[1]), subsets=subsets, subset_size=size)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with seeded(seed):  # torchmetrics draws the subsets with torch.randperm from the global RNG
        mean, std = metric.compute()
    return float(mean), float(std)


# ------------------------------------------------------------------------------------ IS
def inception_score(log_probs: torch.Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """IS of (N, K) class log-probabilities (mean and std over ``splits``), by torchmetrics.

    $\\mathrm{IS} = \\exp\\big(\\mathbb{E}_x\\,\\mathrm{KL}(p(y|x)\\,\\|\\,p(y))\\big)$, $p(y)$ the mean of $p(y|x)$ over a split.
    torchmetrics applies a softmax to what it is given; the softmax of log-probabilities is the
    probabilities themselves, so normalised log-probs (or raw logits) both work.
    """
    from torchmetrics.image.inception import InceptionScore

    with _quiet():
        metric = InceptionScore(feature=Passthrough(log_probs.shape[1]), splits=min(splits, len(log_probs)))
    metric.update(log_probs.double())
    with seeded(seed):  # torchmetrics shuffles with torch.randperm before splitting
        mean, std = metric.compute()
    return float(mean), float(std) if torch.isfinite(std) else 0.0


# ------------------------------------------------------------------------------------ precision / recall
@dataclass
class PrecisionRecall:
    precision: float  # share of the fake set inside the real manifold (fidelity)
    recall: float  # share of the real set inside the fake manifold (diversity)


def knn_radii(features: torch.Tensor, k: int, chunk_size: int = 1024) -> torch.Tensor:
    """(N,) distance of every point to its k-th nearest neighbour in the same set (itself excluded)."""
    if len(features) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set, got {len(features)}")
    radii = []
    for start in range(0, len(features), chunk_size):
        distances = torch.cdist(features[start:start + chunk_size], features)  # (c, N)
        radii.append(distances.kthvalue(k + 1, dim=1).values)  # the 1st nearest is the point itself
    return torch.cat(radii)


def manifold_coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor,
                      chunk_size: int = 1024) -> torch.Tensor:
    """(Q,) bool: is each query inside some support point's k-NN ball, $\\exists j: \\|q - s_j\\| \\le r_j$?"""
    inside = []
    for start in range(0, len(queries), chunk_size):
        distances = torch.cdist(queries[start:start + chunk_size], support)  # (c, S)
        inside.append((distances <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real_feats: torch.Tensor, fake_feats: torch.Tensor, k: int = 3,
                     chunk_size: int = 1024) -> PrecisionRecall:
    """Improved precision and recall (Kynkaanniemi et al. 2019, eq. 1-3).

    The manifold of a set $\\Phi$ is the union of balls around its points, each with the radius of
    that point's k-th nearest neighbour; $f(\\phi, \\Phi) = 1$ if $\\phi$ lies in it.
    $\\text{precision} = \\frac{1}{|\\Phi_g|}\\sum_{\\phi_g} f(\\phi_g, \\Phi_r)$,
    $\\text{recall} = \\frac{1}{|\\Phi_r|}\\sum_{\\phi_r} f(\\phi_r, \\Phi_g)$.
    """
    real = torch.as_tensor(real_feats, dtype=torch.float64)
    fake = torch.as_tensor(fake_feats, dtype=torch.float64)
    real_radii = knn_radii(real, k, chunk_size)  # (N,)
    fake_radii = knn_radii(fake, k, chunk_size)  # (M,)
    precision = manifold_coverage(fake, real, real_radii, chunk_size).double().mean()
    recall = manifold_coverage(real, fake, fake_radii, chunk_size).double().mean()
    return PrecisionRecall(precision=float(precision), recall=float(recall))


# ------------------------------------------------------------------------------------ alignment
def _accuracy_summary(correct: torch.Tensor, attributes: Sequence[str]) -> dict[str, Any]:
    """(n, A) bool -> per-attribute accuracy, all-attributes-correct accuracy, n."""
    if len(correct) == 0:
        return {"per_attribute": {name: None for name in attributes}, "all": None, "n": 0}
    return {
        "per_attribute": {name: correct[:, a].float().mean().item() for a, name in enumerate(attributes)},
        "all": correct.all(dim=1).float().mean().item(),
        "n": len(correct),
    }


def prompt_alignment(predicted: torch.Tensor, target: torch.Tensor, held_out_mask: Optional[torch.Tensor] = None,
                     attributes: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """How often the evaluator reads, in an image, each attribute its prompt asked for.

    ``predicted`` and ``target`` are (N, A) labels (the evaluator's reading of the image, and the
    labels the prompt was written from); ``held_out_mask`` (N,) marks prompts whose attribute
    combination was held out of the generative model's training. Returns per-attribute and
    all-attributes-correct accuracy overall, and the same for ``held_out`` and ``seen`` prompts
    (``None`` when there is no mask or no held-out prompt).
    """
    if predicted.shape != target.shape or predicted.ndim != 2:
        raise ValueError(f"predicted and target must both be (N, A), got {tuple(predicted.shape)} and "
                         f"{tuple(target.shape)}")
    names = list(attributes) if attributes is not None else [f"attribute_{a}" for a in range(target.shape[1])]
    correct = predicted.cpu() == target.cpu()  # (N, A)
    result = _accuracy_summary(correct, names)
    result["held_out"] = result["seen"] = None
    if held_out_mask is not None and held_out_mask.any():
        mask = held_out_mask.cpu().bool()
        result["held_out"] = _accuracy_summary(correct[mask], names)
        result["seen"] = _accuracy_summary(correct[~mask], names)
    return result


def count_objects(images: torch.Tensor, threshold: float = 0.25, min_area: int = 8, smooth: int = 3) -> torch.Tensor:
    """(B,) the number of objects in each image of ``images`` (B, C, H, W) in [-1, 1], for data that draws one object
    on a plain background (shapes, Fashion-MNIST): the 8-connected regions of at least ``min_area`` pixels that
    differ from the background by more than ``threshold`` in some channel, after a ``smooth`` x ``smooth`` box blur
    (so that the speckle a sampler leaves is not a crowd of objects; a faint blob of a few pixels' width stays one).
    The background is each image's median border pixel (per channel).

    Alignment reads *which* shape an image shows, not *how many*: an image with two red circles reads as "a red
    circle". The share of images with exactly one object, beside the real images' (the ceiling), counts them."""
    b, _, h, w = images.shape
    if smooth > 1:
        pad = smooth // 2
        images = nn.functional.avg_pool2d(nn.functional.pad(images, (pad,) * 4, mode="replicate"), smooth, stride=1)
    border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]], dim=2)
    background = border.median(dim=2).values[:, :, None, None]  # (B, C, 1, 1)
    mask = ((images - background).abs().amax(dim=1) > threshold).float()  # (B, H, W): object pixels
    # connected components by label propagation: each object pixel starts with its own index (1..HW) and takes the
    # largest index among its 3x3 neighbours until nothing changes; a region ends labelled by its largest index
    labels = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w).expand(b, h, w) * mask
    while True:
        spread = nn.functional.max_pool2d(labels[:, None], 3, stride=1, padding=1)[:, 0] * mask
        if torch.equal(spread, labels):
            break
        labels = spread
    per_image = labels.long() + torch.arange(b).view(b, 1, 1) * (h * w + 1)  # (B, H, W): ids unique per image
    ids, areas = torch.unique(per_image[mask.bool()], return_counts=True)
    return torch.bincount(ids[areas >= min_area] // (h * w + 1), minlength=b)
