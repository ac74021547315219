"""The latent-diffusion lab: a KL autoencoder and a text-conditioned DDPM over its latents (Rombach et al. 2022).

    autoencoder.py  the first stage: encoder, decoder, their loss (reconstruction + a small KL)
    lab.py          LDMConfig and LatentDiffusionLab (both stages, the scale factor, the sampling pipeline)
    exercises.py    the notebook's checks (06_latent_diffusion.ipynb)

    genlab train model=ldm data=shapes preset=cpu
    genlab sample run=<dir> prompt="a red circle" sampler=ddim steps=25 guidance=3 n=16
    genlab sample run=<dir> mode=reconstruct n=16     # the autoencoder's reconstructions

A composite lab: it imports ``labs.diffusion`` (the latent DDPM is a ``DiffusionLab``) and ``labs.vae`` (the
autoencoder's building blocks), the two labs it composes.
"""

from .autoencoder import AutoencoderConfig, KLAutoencoder, LatentDecoder, LatentEncoder, LatentPosterior
from .lab import LatentDiffusionLab, LDMConfig

__all__ = [
    "AutoencoderConfig",
    "KLAutoencoder",
    "LDMConfig",
    "LatentDecoder",
    "LatentDiffusionLab",
    "LatentEncoder",
    "LatentPosterior",
]
