r"""The networks of the VAE: a convolutional encoder $q_\phi(z \mid x, c)$ and decoder $p_\theta(x \mid z, c)$.

Bottom-up: a residual block, down/up-sampling, the config, the encoder, the decoder.
Both networks are small ResNets with GroupNorm (no BatchNorm: batch statistics would couple
the images of a batch and misbehave under DistributedDataParallel). The condition $c$ is the
prompt's pooled text vector, concatenated with the flattened features in the encoder and with
$z$ in the decoder (the conditional VAE of Sohn et al. 2015), whose embedding of $[z; c]$ also
modulates every block (FiLM); an unconditional VAE has ``cond_dim = 0``.

    x0 (B, C, S, S) --stem, then per level: /2, residual blocks--> (B, ch[-1], S/2^L, S/2^L) --flatten, [.; c], MLP--> mu, logvar (B, Z)
    [z; c] (B, Z + D_c) --MLP, reshape--> (B, ch[-1], S/2^L, S/2^L) --per level: residual blocks, x2--> x_hat (B, C, S, S)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class ResBlock(nn.Module):
    r"""$h = x + \mathrm{conv}(\mathrm{SiLU}(\mathrm{FiLM}(\mathrm{GN}(\mathrm{conv}(\mathrm{SiLU}(\mathrm{GN}(x)))))))$, with a 1x1 skip when widths differ.

    With ``emb_dim > 0`` the second norm is modulated by a vector ``emb`` (FiLM, Perez et al. 2018:
    $\mathrm{GN}(h)(1 + \gamma) + \beta$, $(\gamma, \beta) = W e$), as diffusion UNets do with their time step.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, emb_dim: int = 0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.film = nn.Linear(emb_dim, 2 * out_channels) if emb_dim else None
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm2(self.conv1(F.silu(self.norm1(x))))  # (B, C_out, H, W)
        if self.film is not None:
            gamma, beta = self.film(emb)[:, :, None, None].chunk(2, dim=1)  # 2 x (B, C_out, 1, 1)
            h = h * (1 + gamma) + beta
        h = self.conv2(F.silu(h))  # (B, C_out, H, W)
        return self.skip(x) + h


class Downsample(nn.Module):
    """A stride-2 3x3 convolution: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution (no checkerboard artefacts): (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


@dataclass
class ConvNetConfig:
    """Shape of the encoder and of its mirror image, the decoder."""

    # width per level; each level halves H, W: 16, 8, 4 px for 32 px images, so a 4x4x64 map meets the MLP.
    # [32, 64, 128] is ~2.3x slower on a CPU for little visible gain on `shapes`
    channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    num_res_blocks: int = 1  # residual blocks per level (GroupNorm + SiLU, no BatchNorm)
    groups: int = 8  # GroupNorm groups (must divide every width)
    # the MLP between the flattened features and (mu, logvar), and its mirror; in the decoder it embeds [z; c], and
    # that embedding modulates every block (FiLM)
    hidden_dim: int = 256

    def __post_init__(self) -> None:
        if not self.channels or any(isinstance(c, bool) or c < 1 for c in self.channels):
            raise ValueError(f"net.channels must be a non-empty list of positive widths, got {list(self.channels)}")
        if self.num_res_blocks < 0:
            raise ValueError(f"net.num_res_blocks must be >= 0, got {self.num_res_blocks}")
        if self.groups < 1 or any(c % self.groups for c in self.channels):
            raise ValueError(f"net.channels {list(self.channels)} must all be divisible by net.groups={self.groups}")
        if self.hidden_dim < 1:
            raise ValueError(f"net.hidden_dim must be positive, got {self.hidden_dim}")

    def bottleneck_size(self, image_size: int) -> int:
        """Side of the smallest feature map, ``image_size / 2**len(channels)`` (an error if not whole)."""
        factor = 2 ** len(self.channels)
        if image_size % factor or image_size < factor:
            raise ValueError(f"image_size={image_size} must be a multiple of 2**len(net.channels)={factor}; "
                             f"use fewer net.channels levels or another data.image_size")
        return image_size // factor


def _widen(in_channels: int, out_channels: int, cfg: ConvNetConfig, emb_dim: int = 0) -> list[nn.Module]:
    """``num_res_blocks`` residual blocks from ``in_channels`` to ``out_channels`` (a 1x1 conv if there are none)."""
    if cfg.num_res_blocks == 0:
        return [nn.Conv2d(in_channels, out_channels, 1)] if in_channels != out_channels else []
    widths = [in_channels] + [out_channels] * cfg.num_res_blocks
    return [ResBlock(a, b, cfg.groups, emb_dim) for a, b in zip(widths[:-1], widths[1:])]


class Posterior(NamedTuple):
    """$q_\\phi(z \\mid x, c) = \\mathcal N(\\mu, \\operatorname{diag}\\exp(\\log\\sigma^2))$."""

    mu: torch.Tensor  # (B, Z)
    logvar: torch.Tensor  # (B, Z), log sigma^2


class Encoder(nn.Module):
    """$q_\\phi(z \\mid x, c)$: convolutions down to a small map, then an MLP on [features; c] to (mu, logvar)."""

    def __init__(self, cfg: ConvNetConfig, in_channels: int, image_size: int, latent_dim: int, cond_dim: int = 0):
        super().__init__()
        side = cfg.bottleneck_size(image_size)
        self.stem = nn.Conv2d(in_channels, cfg.channels[0], 3, padding=1)
        layers: list[nn.Module] = []
        width = cfg.channels[0]
        for channels in cfg.channels:  # halve first, then widen: the costly convolutions run on small maps
            layers.append(Downsample(width))
            layers += _widen(width, channels, cfg)
            width = channels
        self.blocks = nn.Sequential(*layers)
        # no norm before the MLP: a per-image GroupNorm divides out each group's amplitude, which
        # can be all that tells one colour of a single shape from another
        self.mlp = nn.Sequential(
            nn.Linear(width * side * side + cond_dim, cfg.hidden_dim), nn.SiLU(),
            nn.Linear(cfg.hidden_dim, 2 * latent_dim),  # mu and log sigma^2, side by side
        )

    def forward(self, x0: torch.Tensor, c: torch.Tensor | None = None) -> Posterior:
        """x0: (B, C, S, S) in [-1, 1]; c: (B, D_c) or None -> Posterior of (B, Z) tensors."""
        h = self.blocks(self.stem(x0))  # (B, ch[0], S, S) -> (B, ch[-1], s, s), s = S / 2^L
        h = F.silu(h).flatten(1)  # (B, ch[-1] * s * s)
        if c is not None:
            h = torch.cat([h, c], dim=1)  # (B, ch[-1] * s * s + D_c)
        mu, logvar = self.mlp(h).chunk(2, dim=1)  # 2 x (B, Z)
        return Posterior(mu, logvar)


class ConditionalPrior(nn.Module):
    r"""$p_\psi(z \mid c) = \mathcal N(\mu_\psi(c), \operatorname{diag}\exp(\log s^2_\psi(c)))$: the prior of a
    conditional VAE learned from the prompt (Sohn et al. 2015, sec. 4), an MLP on the pooled text vector.

    Why it is there: with the fixed prior $\mathcal N(0, I)$ the encoder sees the image and puts
    where the shape is into $z$ long before the text path has learned the position words; the
    decoder then reads position from $z$, and a prompt's "at the top left" has nothing to act on
    when $z \sim \mathcal N(0, I)$ is drawn (measured: position at chance, 0.15-0.17). With a
    learned prior, $z$ may still carry position, but the KL now charges it against $p(z \mid c)$,
    whose mean learns where each prompt's shape is: drawing $z \sim p(z \mid c)$ puts it there.
    The last layer starts at zero, so training starts from $p(z \mid c) = \mathcal N(0, I)$."""

    def __init__(self, cond_dim: int, latent_dim: int, hidden_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(cond_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, 2 * latent_dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, c: torch.Tensor) -> Posterior:
        """c: (B, D_c) -> (mu, logvar) of p(z | c), each (B, Z)."""
        mu, logvar = self.net(c).chunk(2, dim=1)
        return Posterior(mu, logvar)


class Decoder(nn.Module):
    r"""$p_\theta(x \mid z, c)$: an MLP embeds $e = \mathrm{MLP}([z; c])$, a linear map turns $e$ into a small
    feature map, and convolutions bring it up to the image; every residual block and the output
    norm are FiLM-modulated by $e$, so $z$ and the prompt reach every resolution directly.

    Returns the likelihood's parameter per pixel: the mean $\hat x$ (Gaussian) or logits (Bernoulli)."""

    def __init__(self, cfg: ConvNetConfig, out_channels: int, image_size: int, latent_dim: int, cond_dim: int = 0):
        super().__init__()
        self.side = cfg.bottleneck_size(image_size)
        width = cfg.channels[-1]
        self.embed = nn.Sequential(nn.Linear(latent_dim + cond_dim, cfg.hidden_dim), nn.SiLU())
        self.to_map = nn.Linear(cfg.hidden_dim, width * self.side * self.side)
        layers: list[nn.Module] = []
        for channels in reversed(cfg.channels):  # narrow first, then double: the mirror image of the encoder
            layers += _widen(width, channels, cfg, emb_dim=cfg.hidden_dim)
            layers.append(Upsample(channels))
            width = channels
        self.blocks = nn.ModuleList(layers)
        self.norm = nn.GroupNorm(cfg.groups, width)
        self.film = nn.Linear(cfg.hidden_dim, 2 * width)
        self.out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        """z: (B, Z); c: (B, D_c) or None -> (B, C, S, S), unbounded (mean or logits)."""
        zc = z if c is None else torch.cat([z, c], dim=1)  # [z; c]: (B, Z + D_c)
        emb = self.embed(zc)  # e: (B, hidden_dim)
        h = self.to_map(emb).unflatten(1, (-1, self.side, self.side))  # (B, ch[-1], s, s)
        for block in self.blocks:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)  # ... -> (B, ch[0], S, S)
        gamma, beta = self.film(emb)[:, :, None, None].chunk(2, dim=1)  # 2 x (B, ch[0], 1, 1)
        h = self.norm(h) * (1 + gamma) + beta
        return self.out(F.silu(h))  # (B, C, S, S)
