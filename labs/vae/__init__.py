"""The VAE lab: a convolutional (conditional) VAE with its ELBO written out term by term.

    elbo.py   reparameterise, the closed-form KL, the likelihoods, the beta-ELBO (no network)
    model.py  the convolutional encoder q(z|x, c), decoder p(x|z, c) and conditional prior p(z|c)
    lab.py    VAEConfig and VAELab (training step, sampling, reconstruction, interpolation)

    genlab train model=vae data=shapes preset=cpu
    genlab sample run=<dir> prompt="a red circle" n=16
    genlab sample run=<dir> mode=reconstruct n=16      |   mode=interpolate prompt="a blue square"
"""

from .elbo import (
    LIKELIHOODS, SIGMA_MODES, ELBOTerms, bernoulli_nll, bits_per_dim, decoded_to_image, discretized_gaussian_nll,
    gaussian_kl, gaussian_nll, kl_divergence, kl_weight, negative_elbo, reconstruction_nll, reparameterize,
)
from .lab import INTERPOLATIONS, VAEConfig, VAELab, VAEOutput, slerp
from .model import ConditionalPrior, ConvNetConfig, Decoder, Downsample, Encoder, Posterior, ResBlock, Upsample

__all__ = [
    "INTERPOLATIONS",
    "LIKELIHOODS",
    "SIGMA_MODES",
    "ConditionalPrior",
    "ConvNetConfig",
    "Decoder",
    "Downsample",
    "ELBOTerms",
    "Encoder",
    "Posterior",
    "ResBlock",
    "Upsample",
    "VAEConfig",
    "VAELab",
    "VAEOutput",
    "bernoulli_nll",
    "bits_per_dim",
    "decoded_to_image",
    "discretized_gaussian_nll",
    "gaussian_kl",
    "gaussian_nll",
    "kl_divergence",
    "kl_weight",
    "negative_elbo",
    "reconstruction_nll",
    "reparameterize",
    "slerp",
]
