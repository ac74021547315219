r"""The first stage of latent diffusion: a KL-regularised convolutional autoencoder (Rombach et al. 2022, sec. 3).

The encoder maps an image to a *spatial* Gaussian posterior $q(z \mid x) = \mathcal N(\mu, \operatorname{diag}\sigma^2)$
with $z$ of shape (z_channels, S / f, S / f): for 32x32x3 images and $f = 4$, 4x8x8, twelve times fewer
numbers than pixels, still laid out like the image (a latent "pixel" describes a 4x4 patch), so a UNet
can denoise it like a small image. The decoder maps $z$ back to pixels. The loss is the reconstruction
error plus a *small* KL weight,

$\mathcal L = \tfrac{1}{P}\lVert x - D(z)\rVert^2 + \lambda_\text{KL}\,\tfrac{1}{P} D_{KL}(q(z \mid x)\,\Vert\,\mathcal N(0, I))$,  $z \sim q(z \mid x)$,

($P$ pixels; both terms per pixel, so $\lambda_\text{KL}$ is Rombach et al.'s weight on the summed KL): enough
to keep the latents near $\mathcal N(0, I)$ and their variance from drifting, far too little to blur the
reconstructions the way a VAE's full KL does (the VAE of ``labs/vae`` must *sample* from its prior; this
autoencoder is never sampled from: the diffusion model learns the latents' distribution instead).

The building blocks (residual blocks, down/up-sampling, the reparameterisation and the KL) are the VAE
lab's (``labs.vae``): this composite lab reuses them rather than copying them.

    x (B, 3, 32, 32) --stem, [res blocks, /2] per level--> (B, ch[-1], 8, 8) --SiLU, conv--> mu, logvar (B, 4, 8, 8)
    z (B, 4, 8, 8)   --conv, [res blocks, x2] per level--> (B, ch[0], 32, 32) --SiLU, conv--> x_hat (B, 3, 32, 32)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from labs.vae.elbo import kl_divergence, reparameterize
from labs.vae.model import Downsample, ResBlock, Upsample


@dataclass
class AutoencoderConfig:
    """Shape of the first stage: a 2x2 patch fold, then ``len(channels) - 1`` halvings: f = patch_size * 2**(levels - 1)."""

    # width per level, the first at S / patch_size: 16 and 8 px after the 2x2 patches, f = 2 x 2 = 4 -> 8x8 latents
    channels: list[int] = field(default_factory=lambda: [16, 32])
    num_res_blocks: int = 1  # residual blocks per level (the decoder has the same)
    z_channels: int = 4  # latent channels (Rombach et al.'s f4 autoencoders use 3, their f8 ones 4)
    groups: int = 8  # GroupNorm groups (must divide every width)
    # 2: fold 2x2 pixel patches into channels first (and unfold last): every level at half size, 2x cheaper than a
    # level at 32 px
    patch_size: int = 2

    def __post_init__(self) -> None:
        if len(self.channels) < 1 or any(isinstance(c, bool) or c < 1 for c in self.channels):
            raise ValueError(f"autoencoder.channels must be a non-empty list of positive widths, got {list(self.channels)}")
        if self.groups < 1 or any(c % self.groups for c in self.channels):
            raise ValueError(f"autoencoder.channels {list(self.channels)} must all be divisible by "
                             f"autoencoder.groups={self.groups}")
        if self.num_res_blocks < 1:
            raise ValueError(f"autoencoder.num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if self.patch_size < 1:
            raise ValueError(f"autoencoder.patch_size must be >= 1, got {self.patch_size}")
        if self.z_channels < 1:
            raise ValueError(f"autoencoder.z_channels must be positive, got {self.z_channels}")

    @property
    def factor(self) -> int:
        """f: how much smaller the latent's side is than the image's (the patch, then one halving per level)."""
        return self.patch_size * 2 ** (len(self.channels) - 1)

    def latent_size(self, image_size: int) -> int:
        if image_size % self.factor:
            raise ValueError(f"image_size={image_size} is not a multiple of the autoencoder's factor {self.factor} "
                             f"(patch_size * 2**(len(autoencoder.channels) - 1)); use fewer levels or another data.image_size")
        return image_size // self.factor


class LatentPosterior(NamedTuple):
    r"""$q(z \mid x) = \mathcal N(\mu, \operatorname{diag}\exp(\log\sigma^2))$, both (B, z_channels, s, s)."""

    mu: torch.Tensor
    logvar: torch.Tensor

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mu + sigma * eps, eps from ``generator`` (or the global RNG)."""
        eps = torch.randn(self.mu.shape, generator=generator, device=self.mu.device, dtype=self.mu.dtype)
        return reparameterize(self.mu, self.logvar, eps)

    def kl(self) -> torch.Tensor:
        r"""$D_{KL}(q \Vert \mathcal N(0, I))$ summed over a latent's elements: (B,)."""
        return kl_divergence(self.mu.flatten(1), self.logvar.flatten(1))


def _blocks(in_channels: int, out_channels: int, cfg: AutoencoderConfig) -> list[nn.Module]:
    widths = [in_channels] + [out_channels] * cfg.num_res_blocks
    return [ResBlock(a, b, cfg.groups) for a, b in zip(widths[:-1], widths[1:])]


class LatentEncoder(nn.Module):
    """x (B, C, S, S) in [-1, 1] -> the posterior over z (B, z_channels, S / f, S / f)."""

    def __init__(self, cfg: AutoencoderConfig, in_channels: int):
        super().__init__()
        self.patch = cfg.patch_size
        self.stem = nn.Conv2d(in_channels * self.patch ** 2, cfg.channels[0], 3, padding=1)
        layers: list[nn.Module] = []
        width = cfg.channels[0]
        for level, channels in enumerate(cfg.channels):
            if level > 0:
                layers.append(Downsample(width))  # halve, then widen: the wide convolutions run on small maps
            layers += _blocks(width, channels, cfg)
            width = channels
        self.blocks = nn.Sequential(*layers)
        # no GroupNorm before the output (Rombach et al. have one): normalising each image's features divides out
        # the amplitude that tells one colour of a lone shape from another (the VAE lab's encoder found the same)
        self.out = nn.Sequential(nn.SiLU(), nn.Conv2d(width, 2 * cfg.z_channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> LatentPosterior:
        x = F.pixel_unshuffle(x, self.patch) if self.patch > 1 else x  # (B, C p^2, S / p, S / p)
        mu, logvar = self.out(self.blocks(self.stem(x))).chunk(2, dim=1)  # 2 x (B, z_channels, s, s)
        return LatentPosterior(mu, logvar.clamp(-30.0, 20.0))  # as Rombach et al.: exp() stays finite


class LatentDecoder(nn.Module):
    """z (B, z_channels, s, s) -> x_hat (B, C, s * f, s * f), unbounded (the loss pulls it into [-1, 1])."""

    def __init__(self, cfg: AutoencoderConfig, out_channels: int):
        super().__init__()
        widths = list(reversed(cfg.channels))
        self.stem = nn.Conv2d(cfg.z_channels, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        width = widths[0]
        for level, channels in enumerate(widths):
            if level > 0:
                layers.append(Upsample(width))  # nearest x2 then a conv: no checkerboard artefacts
            layers += _blocks(width, channels, cfg)
            width = channels
        self.blocks = nn.Sequential(*layers)
        self.patch = cfg.patch_size
        self.out = nn.Sequential(nn.SiLU(), nn.Conv2d(width, out_channels * self.patch ** 2, 3, padding=1))  # no norm

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.out(self.blocks(self.stem(z)))  # (B, C p^2, S / p, S / p)
        return F.pixel_shuffle(x, self.patch) if self.patch > 1 else x


class AutoencoderLoss(NamedTuple):
    loss: torch.Tensor  # the objective: mse + kl_weight * kl_per_pixel
    mse: torch.Tensor  # per pixel, on [-1, 1] images
    kl: torch.Tensor  # D_KL summed over a latent, averaged over the batch


class KLAutoencoder(nn.Module):
    """The encoder E, the decoder D and their loss."""

    def __init__(self, cfg: AutoencoderConfig, channels: int):
        super().__init__()
        self.cfg = cfg
        self.encoder = LatentEncoder(cfg, channels)
        self.decoder = LatentDecoder(cfg, channels)

    def encode(self, x: torch.Tensor) -> LatentPosterior:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def loss(self, x: torch.Tensor, kl_weight: float) -> AutoencoderLoss:
        posterior = self.encoder(x)
        recon = self.decoder(posterior.sample())  # global RNG: the trainer seeds and checkpoints it
        mse = F.mse_loss(recon.float(), x.float())  # mean over every pixel
        kl = posterior.kl().float().mean()  # (B,) -> mean
        pixels = x[0].numel()
        return AutoencoderLoss(mse + kl_weight * kl / pixels, mse.detach(), kl.detach())

