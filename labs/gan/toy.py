r"""A GAN small enough to watch: MLPs on a ring of 2-D Gaussians (seconds on a CPU).

The data is a mixture of ``modes`` Gaussians with centres on a circle (the 8-Gaussian ring of
Metz et al. 2017, "Unrolled GANs", sec. 3.1). With the plain BCE loss the generator tends to
*collapse*: it covers one or a few modes and hops between them, because each generator step
only moves its samples towards wherever the current discriminator is most fooled. The
Wasserstein loss with the gradient penalty gives the generator a useful gradient towards every
mode it misses, and covers the ring.

The same loss functions as the image GAN are used (``losses.py``); only the networks differ.
:func:`mode_coverage` counts the covered modes the way Srivastava et al. 2017 ("VEEGAN", sec. 5.1)
do: a sample belongs to a mode if it lies within 3 standard deviations of its centre.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .losses import LOSSES, critic_loss, generator_loss, gradient_penalty


@dataclass
class ToyConfig:
    loss: str = "bce"  # wgan_gp | hinge | bce
    steps: int = 1000  # generator updates
    batch_size: int = 128
    z_dim: int = 2  # noise dimension
    hidden: int = 64  # MLP width
    depth: int = 3  # hidden layers of each MLP
    n_critic: int = 5  # critic updates per generator update (the WGAN-GP recipe, used for every loss here)
    gp_weight: float = 0.1  # lambda of wgan_gp (Gulrajani et al.'s toy runs use 0.1: 2-D data, not pixels)
    label_smoothing: float = 0.0  # bce only
    non_saturating: bool = True  # bce only
    lr_generator: float = 5e-4  # the same for both players, so only the loss differs between runs
    lr_critic: float = 5e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # Adam, both players
    modes: int = 8  # Gaussians on the ring
    radius: float = 2.0  # of the ring
    std: float = 0.05  # of each Gaussian
    seed: int = 0
    snapshot_every: int = 250  # keep generated points every this many steps (and at the end)
    snapshot_size: int = 1000  # points per snapshot
    num_threads: Optional[int] = 1  # torch threads while training: MLPs this small run fastest on one; null = as is

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        for name in ("steps", "batch_size", "z_dim", "hidden", "depth", "n_critic", "modes", "snapshot_every",
                     "snapshot_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def ring_centres(modes: int, radius: float) -> torch.Tensor:
    """(modes, 2) centres evenly spaced on a circle of ``radius``."""
    angles = 2 * math.pi * torch.arange(modes) / modes  # (modes,)
    return radius * torch.stack([angles.cos(), angles.sin()], dim=1)  # (modes, 2)


def sample_mixture(n: int, centres: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """n points of the equal-weight mixture of N(centre_k, std^2 I): (n, 2)."""
    k = torch.randint(len(centres), (n,), generator=generator)  # which mode: (n,)
    return centres[k] + std * torch.randn(n, 2, generator=generator)  # (n, 2)


def mlp(in_dim: int, hidden: int, depth: int, out_dim: int) -> nn.Sequential:
    """Linear -> ReLU, ``depth`` times, then Linear (no BatchNorm: the gradient penalty is per sample)."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(in_dim if i == 0 else hidden, hidden), nn.ReLU()]
    layers.append(nn.Linear(hidden, out_dim))
    return nn.Sequential(*layers)


class ToyGAN(nn.Module):
    """G: (B, z_dim) -> (B, 2); D: (B, 2) -> (B,) scores."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.generator = mlp(cfg.z_dim, cfg.hidden, cfg.depth, 2)
        self.critic = mlp(2, cfg.hidden, cfg.depth, 1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        return self.critic(x).squeeze(-1)  # (B,)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.generator(torch.randn(n, self.cfg.z_dim, generator=generator))  # (n, 2)


@dataclass
class ModeCoverage:
    covered: int  # modes holding at least `min_count` samples
    counts: list[int]  # samples within 3 std of each centre
    high_quality: float  # fraction of samples within 3 std of some centre


def mode_coverage(samples: torch.Tensor, centres: torch.Tensor, std: float, min_count: int = 20) -> ModeCoverage:
    """Assign each sample (N, 2) to its nearest centre (K, 2) if it lies within 3 std of it."""
    distance = torch.cdist(samples, centres)  # (N, K)
    nearest, index = distance.min(dim=1)  # (N,), (N,)
    good = nearest < 3 * std
    counts = torch.bincount(index[good], minlength=len(centres))  # (K,)
    return ModeCoverage(covered=int((counts >= min_count).sum()), counts=counts.tolist(),
                        high_quality=good.float().mean().item())


@dataclass
class ToyRun:
    model: ToyGAN
    centres: torch.Tensor  # (modes, 2)
    history: dict[str, list[float]]  # "critic", "generator" (and "gradient_penalty") per step
    snapshots: dict[int, torch.Tensor]  # step -> (snapshot_size, 2) generated points, same z every time


def train_toy(cfg: ToyConfig) -> ToyRun:
    """Train a :class:`ToyGAN` on the ring; seeded by ``cfg.seed``, leaves the global RNG untouched."""
    threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _train_toy(cfg)
    finally:
        torch.set_num_threads(threads)


def _train_toy(cfg: ToyConfig) -> ToyRun:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = ToyGAN(cfg)
        centres = ring_centres(cfg.modes, cfg.radius)
        opt_g = torch.optim.Adam(model.generator.parameters(), lr=cfg.lr_generator, betas=tuple(cfg.betas))
        opt_d = torch.optim.Adam(model.critic.parameters(), lr=cfg.lr_critic, betas=tuple(cfg.betas))
        fixed_z = torch.randn(cfg.snapshot_size, cfg.z_dim)  # the same z at every snapshot
        history: dict[str, list[float]] = {"critic": [], "generator": []}
        snapshots: dict[int, torch.Tensor] = {}
        for step in range(1, cfg.steps + 1):
            # (1) Update D: minimise the critic loss (+ lambda GP for wgan_gp), n_critic times
            for _ in range(cfg.n_critic):
                real = sample_mixture(cfg.batch_size, centres, cfg.std)  # x ~ p_data: (B, 2)
                with torch.no_grad():
                    fake = model.generator(torch.randn(cfg.batch_size, cfg.z_dim))  # G(z): (B, 2)
                d_loss = critic_loss(cfg.loss, model.score(real), model.score(fake), cfg.label_smoothing)
                if cfg.loss == "wgan_gp":
                    gp = gradient_penalty(model.score, real, fake).penalty
                    d_loss = d_loss + cfg.gp_weight * gp
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
            # (2) Update G: minimise the generator loss (-E[D(G(z))], or -E[log D(G(z))] for bce)
            fake = model.generator(torch.randn(cfg.batch_size, cfg.z_dim))
            g_loss = generator_loss(cfg.loss, model.score(fake), cfg.non_saturating)
            opt_g.zero_grad(set_to_none=True)
            g_loss.backward()
            opt_g.step()

            history["critic"].append(d_loss.item())
            history["generator"].append(g_loss.item())
            if cfg.loss == "wgan_gp":
                history.setdefault("gradient_penalty", []).append(gp.item())
            if step % cfg.snapshot_every == 0 or step == cfg.steps:
                with torch.no_grad():
                    snapshots[step] = model.generator(fixed_z)
    return ToyRun(model=model, centres=centres, history=history, snapshots=snapshots)
