"""The GAN lab: a conditional DCGAN with the WGAN-GP, hinge and BCE losses and their stabilisers.

    losses.py  the critic and generator losses, gradient_penalty, R1, label smoothing (no network)
    model.py   SAGAN self-attention, conditional GroupNorm, the generator, the projection critic
    lab.py     DCGANConfig and GANLab (n_critic critic updates + 1 generator update, sampling)
    toy.py     MLP GANs on a ring of 2-D Gaussians (mode collapse in seconds)

    genlab train model=dcgan data=shapes preset=cpu
    genlab sample run=<dir> prompt="a red circle" n=16
"""

from .lab import DCGANConfig, GANLab, GANSampleOptions
from .losses import (
    LOSSES, GradientPenalty, bce_critic_loss, bce_generator_loss, critic_loss, generator_loss, gradient_penalty,
    hinge_critic_loss, hinge_generator_loss, interpolate, matching_loss, r1_penalty, smoothed_targets,
    wasserstein_critic_loss, wasserstein_generator_loss,
)
from .model import (
    ConditionalGroupNorm, Critic, CriticConfig, Generator, GeneratorConfig, ProjectionHead, SelfAttention2d,
    maybe_spectral_norm,
)
from .toy import ModeCoverage, ToyConfig, ToyGAN, ToyRun, mode_coverage, ring_centres, sample_mixture, train_toy

__all__ = [
    "LOSSES",
    "ConditionalGroupNorm",
    "Critic",
    "CriticConfig",
    "DCGANConfig",
    "GANLab",
    "GANSampleOptions",
    "Generator",
    "GeneratorConfig",
    "GradientPenalty",
    "ModeCoverage",
    "ProjectionHead",
    "SelfAttention2d",
    "ToyConfig",
    "ToyGAN",
    "ToyRun",
    "bce_critic_loss",
    "bce_generator_loss",
    "critic_loss",
    "generator_loss",
    "gradient_penalty",
    "hinge_critic_loss",
    "hinge_generator_loss",
    "interpolate",
    "matching_loss",
    "maybe_spectral_norm",
    "mode_coverage",
    "r1_penalty",
    "ring_centres",
    "sample_mixture",
    "smoothed_targets",
    "train_toy",
    "wasserstein_critic_loss",
    "wasserstein_generator_loss",
]
