r"""A conditional DCGAN, built bottom-up: self-attention, conditional normalisation, the
generator's and the critic's blocks, the projection head, the configs, then the two networks.

- Generator (Radford et al. 2016, "DCGAN", fig. 1): $z$ and the prompt's embedding
  $e(c)$ are concatenated and projected to a small feature map, then transposed convolutions
  (4x4, stride 2) double the resolution up to the image, with ``tanh`` at the end. $[z; e(c)]$
  also sets the scale and shift of every normalisation layer (conditional normalisation, de Vries
  et al. 2017; the conditional BatchNorm of Miyato & Koyama 2018 sec. 4, here on GroupNorm; $z$ there
  too is BigGAN's "skip-z", Brock et al. 2019 sec. 3), so prompt and noise act at every scale.
- Critic: strided 4x4 convolutions with LeakyReLU(0.2) (DCGAN), conditioned by *projection*
  (Miyato & Koyama 2018, "cGANs with Projection Discriminator", eq. 3):
  $D(x, y) = \psi(\phi(x)) + (V y)^\top \phi(x)$.
- Optional self-attention (SAGAN, Zhang et al. 2019) in both, and optional spectral
  normalisation of every critic layer (Miyato et al. 2018, "Spectral Normalization for GANs").

No BatchNorm anywhere by default: the gradient penalty is a per-sample quantity, and BatchNorm
would make one sample's score depend on the rest of the batch (Gulrajani et al. sec. 4); it also
complicates DistributedDataParallel. ``critic.norm=batch`` exists only for the original DCGAN with
``loss=bce`` and is rejected with a gradient penalty. The networks only map tensors; the losses are
in ``losses.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm


def maybe_spectral_norm(layer: nn.Module, enabled: bool) -> nn.Module:
    r"""$W \leftarrow W / \sigma(W)$, $\sigma$ the largest singular value of $W$ reshaped to (out, in*k*k),
    estimated by one power iteration per forward pass (Miyato et al. 2018, Algorithm 1)."""
    return _spectral_norm(layer) if enabled else layer


class SpectralNormEstimate(NamedTuple):
    sigma: torch.Tensor  # () the estimate u^T W v of sigma_max(W)
    u: torch.Tensor  # (out,) the estimate of the top left singular vector, kept for the next step


def power_iteration(weight: torch.Tensor, u: torch.Tensor, n_iterations: int = 1,
                    eps: float = 1e-12) -> SpectralNormEstimate:
    r"""$\sigma(W)$ by power iteration (Miyato et al. 2018, "Spectral Normalization for GANs", Algorithm 1):

    $v \leftarrow W^\top u / \lVert W^\top u\rVert_2,\quad u \leftarrow W v / \lVert W v\rVert_2$ ($n$ times),
    then $\sigma(W) \approx u^\top W v$.

    ``weight``: (out, in), or a convolution's (out, in, k, k) read as (out, in*k*k); ``u``: (out,), the previous
    estimate (any non-zero start). What ``maybe_spectral_norm`` runs once per training forward pass (torch keeps
    ``u`` in a buffer: the same sequence of $u$); spelled out here for the notebook's exercise. $u, v$ are
    constants, $\sigma$ is differentiable in $W$ (as in the paper's update of $W / \sigma(W)$).
    """
    if n_iterations < 1:
        raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
    W = weight.flatten(1)  # (out, in*k*k)
    with torch.no_grad():
        for _ in range(n_iterations):
            v = F.normalize(W.t() @ u, dim=0, eps=eps)  # v = W^T u / ||W^T u||: (in,)
            u = F.normalize(W @ v, dim=0, eps=eps)  # u = W v / ||W v||: (out,)
    sigma = u @ (W @ v)  # sigma(W) ~ u^T W v
    return SpectralNormEstimate(sigma=sigma, u=u)


class SelfAttention2d(nn.Module):
    r"""SAGAN self-attention (Zhang et al. 2019, "Self-Attention GANs", sec. 3).

    $s_{ij} = f(x_i)^\top g(x_j)$, $\beta_{j,i} = \mathrm{softmax}_i(s_{ij})$ (eq. 1),
    $o_j = \sum_i \beta_{j,i}\, h(x_i)$ (eq. 2), $y = \gamma\, o + x$ with $\gamma$ initialised
    to 0 (eq. 3), so the block starts as the identity and learns how much to look far away.
    $f, g, h$ are 1x1 convolutions; $f, g$ map to ``channels // key_ratio`` channels.
    """

    def __init__(self, channels: int, key_ratio: int = 8, spectral_norm: bool = False):
        super().__init__()
        key_channels = max(1, channels // key_ratio)
        self.f = maybe_spectral_norm(nn.Conv2d(channels, key_channels, 1), spectral_norm)  # queries
        self.g = maybe_spectral_norm(nn.Conv2d(channels, key_channels, 1), spectral_norm)  # keys
        self.h = maybe_spectral_norm(nn.Conv2d(channels, channels, 1), spectral_norm)  # values
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        query = self.f(x).flatten(2).transpose(1, 2)  # f(x): (B, N, C'), N = H*W
        key = self.g(x).flatten(2)  # g(x): (B, C', N)
        value = self.h(x).flatten(2)  # h(x): (B, C, N)
        beta = (query @ key).softmax(dim=-1)  # s_ij -> beta: (B, N_j, N_i), rows sum to 1 over i
        o = (value @ beta.transpose(1, 2)).view(B, C, H, W)  # o_j = sum_i beta_ji h(x_i): (B, C, N) -> (B, C, H, W)
        return x + self.gamma * o  # y = gamma o + x


class ConditionalGroupNorm(nn.Module):
    r"""$h \leftarrow \mathrm{GN}(h)\,(1 + \gamma(e)) + \beta(e)$: GroupNorm without its own affine,
    then a scale and shift predicted from the conditioning vector $e$ (conditional normalisation,
    de Vries et al. 2017). The predictor starts at zero, so the layer starts as plain GroupNorm."""

    def __init__(self, channels: int, cond_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, affine=False)
        self.scale_shift = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.scale_shift.weight)
        nn.init.zeros_(self.scale_shift.bias)

    def forward(self, h: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.scale_shift(style)[:, :, None, None].chunk(2, dim=1)  # 2 x (B, C, 1, 1)
        return self.norm(h) * (1 + gamma) + beta  # (B, C, H, W)


class GeneratorNorm(nn.Module):
    """The generator's normalisation: ``conditional`` (above), ``group`` (GroupNorm) or ``none``."""

    def __init__(self, kind: str, channels: int, cond_dim: int, groups: int):
        super().__init__()
        self.kind = kind
        if kind == "conditional":
            self.norm = ConditionalGroupNorm(channels, cond_dim, groups)
        elif kind == "group":
            self.norm = nn.GroupNorm(groups, channels)
        else:
            self.norm = nn.Identity()

    def forward(self, h: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return self.norm(h, style) if self.kind == "conditional" else self.norm(h)


class UpBlock(nn.Module):
    """DCGAN generator block: ConvTranspose(4x4, stride 2) doubles H and W -> norm -> ReLU [-> self-attention]."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, norm: str, groups: int,
                 attention: bool, key_ratio: int):
        super().__init__()
        self.conv = nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1)
        self.norm = GeneratorNorm(norm, out_channels, cond_dim, groups)
        self.attention = SelfAttention2d(out_channels, key_ratio) if attention else None

    def forward(self, h: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm(self.conv(h), style))  # (B, C_in, H, W) -> (B, C_out, 2H, 2W)
        return self.attention(h) if self.attention is not None else h


class DownBlock(nn.Module):
    """DCGAN critic block: Conv(4x4, stride 2) halves H and W -> [norm] -> LeakyReLU [-> self-attention]."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, spectral_norm: bool, slope: float,
                 attention: bool, key_ratio: int):
        super().__init__()
        self.conv = maybe_spectral_norm(nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1), spectral_norm)
        if norm == "layer":  # the WGAN-GP paper's suggestion (sec. 4): normalise each sample on its own
            self.norm = nn.GroupNorm(1, out_channels)
        elif norm == "batch":  # the original DCGAN; couples the samples of a batch (not with wgan_gp)
            self.norm = nn.BatchNorm2d(out_channels)
        else:
            self.norm = nn.Identity()
        self.slope = slope
        self.attention = SelfAttention2d(out_channels, key_ratio, spectral_norm) if attention else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.norm(self.conv(h)), self.slope)  # (B, C_in, H, W) -> (B, C_out, H/2, W/2)
        return self.attention(h) if self.attention is not None else h


class ProjectionHead(nn.Module):
    r"""The projection discriminator's output (Miyato & Koyama 2018, eq. 3):

    $D(x, y) = \psi(\phi(x)) + (V y)^\top \phi(x)$

    ``features`` $\phi(x)$: (B, F); ``y`` $y$: (B, cond_dim), here the prompt's pooled text
    vector rather than a one-hot class, so $V$ is a linear map (``embed``) instead of an
    embedding table. $\psi$ (``psi``) scores realism regardless of the prompt; the inner product
    scores how well the image's features match the prompt. Returns scores (B,).
    """

    def __init__(self, feature_dim: int, cond_dim: int, spectral_norm: bool = False):
        super().__init__()
        self.psi = maybe_spectral_norm(nn.Linear(feature_dim, 1), spectral_norm)  # psi
        self.embed = maybe_spectral_norm(nn.Linear(cond_dim, feature_dim, bias=False), spectral_norm)  # V

    def forward(self, features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        unconditional = self.psi(features).squeeze(-1)  # psi(phi(x)): (B,)
        projection = (self.embed(y) * features).sum(dim=-1)  # (V y)^T phi(x): (B, F) . (B, F) -> (B,)
        return unconditional + projection


# ----------------------------------------------------------------------------- configs
GENERATOR_NORMS = ("conditional", "group", "none")
CRITIC_NORMS = ("none", "layer", "batch")


def _positive_ints(owner: str, values: list[int]) -> None:
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{owner}.channels must be a non-empty list of positive ints, got {list(values)}")


@dataclass
class GeneratorConfig:
    z_dim: int = 128  # dimension of the noise z ~ N(0, I)
    cond_dim: int = 128  # e(c) = Linear(pooled text): concatenated with z and fed to every norm layer
    # at image/8, /4, /2 (4, 8, 16 px at 32); a last transposed conv makes the RGB image
    channels: list[int] = field(default_factory=lambda: [256, 128, 64])
    # conditional (GroupNorm, scale/shift from [z; e(c)]) | group | none (no BatchNorm: per-sample, DDP-friendly)
    norm: str = "conditional"
    skip_z: bool = True  # the conditional norms see [z; e(c)], not only e(c) (BigGAN's skip-z): z acts in every block
    groups: int = 8  # GroupNorm groups
    attention_resolution: Optional[int] = 16  # SAGAN block after the block of this size; null = none
    attention_key_ratio: int = 8  # f, g project to channels // key_ratio (Zhang et al. use 8)

    def __post_init__(self) -> None:
        _positive_ints("generator", self.channels)
        for name in ("z_dim", "cond_dim", "groups", "attention_key_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"generator.{name} must be positive, got {getattr(self, name)}")
        if self.norm not in GENERATOR_NORMS:
            raise ValueError(f"generator.norm must be one of {GENERATOR_NORMS}, got {self.norm!r}")
        if self.norm != "none" and any(c % self.groups for c in self.channels):
            raise ValueError(f"generator.channels {list(self.channels)} must be divisible by groups={self.groups}")


@dataclass
class CriticConfig:
    # at image/2, /4, /8 (16, 8, 4 px at 32): DCGAN's strided 4x4 convs, LeakyReLU
    channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    # none | layer | batch; batch is the original DCGAN, refused with wgan_gp (its gradient penalty is per sample)
    norm: str = "none"
    spectral_norm: bool = False  # W / sigma(W) in every layer (Miyato et al. 2018); usual with hinge
    leaky_slope: float = 0.2  # LeakyReLU slope (DCGAN)
    attention_resolution: Optional[int] = 16  # SAGAN block after the block of this size; null = none
    attention_key_ratio: int = 8

    def __post_init__(self) -> None:
        _positive_ints("critic", self.channels)
        if self.norm not in CRITIC_NORMS:
            raise ValueError(f"critic.norm must be one of {CRITIC_NORMS}, got {self.norm!r}")
        if not 0.0 <= self.leaky_slope < 1.0:
            raise ValueError(f"critic.leaky_slope must be in [0, 1), got {self.leaky_slope}")
        if self.attention_key_ratio < 1:
            raise ValueError(f"critic.attention_key_ratio must be positive, got {self.attention_key_ratio}")


def _check_resolutions(owner: str, image_size: int, levels: int, attention: int | None, sizes: list[int]) -> None:
    if image_size % 2**levels:
        raise ValueError(f"image_size={image_size} must be divisible by 2**len({owner}.channels) = {2**levels}")
    if attention is not None and attention not in sizes:
        raise ValueError(f"{owner}.attention_resolution={attention} is not a feature-map size of the "
                         f"{owner}; choose one of {sizes} or null")


# ----------------------------------------------------------------------------- networks
class Generator(nn.Module):
    """$G(z, c)$: (B, z_dim) noise and (B, text_dim) pooled prompt -> (B, C, H, W) images in [-1, 1]."""

    def __init__(self, cfg: GeneratorConfig, out_channels: int, image_size: int, text_dim: int):
        super().__init__()
        levels = len(cfg.channels)
        self.start = image_size // 2**levels  # s0: side of the first feature map
        sizes = [self.start * 2**i for i in range(1, levels)]  # outputs of the up-blocks
        _check_resolutions("generator", image_size, levels, cfg.attention_resolution, sizes)
        self.cfg = cfg
        self.embed = nn.Linear(text_dim, cfg.cond_dim)  # e(c)
        self.project = nn.Linear(cfg.z_dim + cfg.cond_dim, cfg.channels[0] * self.start**2)
        style_dim = cfg.z_dim + cfg.cond_dim if cfg.skip_z else cfg.cond_dim  # what the conditional norms see
        self.norm = GeneratorNorm(cfg.norm, cfg.channels[0], style_dim, cfg.groups)
        self.blocks = nn.ModuleList(
            UpBlock(c_in, c_out, style_dim, cfg.norm, cfg.groups, size == cfg.attention_resolution,
                    cfg.attention_key_ratio)
            for c_in, c_out, size in zip(cfg.channels[:-1], cfg.channels[1:], sizes)
        )
        self.to_image = nn.ConvTranspose2d(cfg.channels[-1], out_channels, 4, stride=2, padding=1)

    def forward(self, z: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        e_c = self.embed(text)  # e(c): (B, cond_dim)
        z_e = torch.cat([z, e_c], dim=1)  # [z; e(c)]: (B, z_dim + cond_dim)
        style = z_e if self.cfg.skip_z else e_c  # input of every conditional norm
        h = self.project(z_e).view(len(z), self.cfg.channels[0], self.start, self.start)  # (B, C0, s0, s0)
        h = F.relu(self.norm(h, style))
        for block in self.blocks:
            h = block(h, style)  # (B, C_i, s, s) -> (B, C_i+1, 2s, 2s)
        return torch.tanh(self.to_image(h))  # (B, C, H, W) in [-1, 1]


class Critic(nn.Module):
    """$D(x, c)$: (B, C, H, W) images and (B, text_dim) pooled prompts -> (B,) unbounded scores."""

    def __init__(self, cfg: CriticConfig, in_channels: int, image_size: int, text_dim: int):
        super().__init__()
        levels = len(cfg.channels)
        sizes = [image_size // 2**i for i in range(1, levels + 1)]  # outputs of the down-blocks
        _check_resolutions("critic", image_size, levels, cfg.attention_resolution, sizes)
        channels = [in_channels, *cfg.channels]
        self.blocks = nn.ModuleList(
            # DCGAN: no normalisation on the first layer, which sees the raw image
            DownBlock(c_in, c_out, cfg.norm if i > 0 else "none", cfg.spectral_norm, cfg.leaky_slope,
                      size == cfg.attention_resolution, cfg.attention_key_ratio)
            for i, (c_in, c_out, size) in enumerate(zip(channels[:-1], channels[1:], sizes))
        )
        feature_dim = cfg.channels[-1] * sizes[-1] ** 2
        self.head = ProjectionHead(feature_dim, text_dim, cfg.spectral_norm)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        r"""$\phi(x)$: (B, C, H, W) -> (B, F), the flattened last feature map (keeps *where* things are)."""
        h = x
        for block in self.blocks:
            h = block(h)  # (B, C_i, s, s) -> (B, C_i+1, s/2, s/2)
        return h.flatten(1)  # (B, C_last * s_last * s_last)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x), text)  # (B,)
