r"""A small text-conditioned UNet $\epsilon_\theta(x_t, t, c)$, built bottom-up.

Attention, residual block, self-attention, cross-attention, the block that chains them,
then the network. The design is Ho et al. 2020 (appendix B: a PixelCNN++-style UNet with
GroupNorm, sinusoidal time embedding and self-attention at low resolution) with the text
conditioning of latent diffusion (Rombach et al. 2022, sec. 3.3: cross-attention from image
positions to the text encoder's token states) and of GLIDE (Nichol et al. 2022: the pooled
text vector added to the time embedding). Residual blocks apply the embedding as a
scale and shift of the normalised features (AdaGN, Dhariwal & Nichol 2021, sec. 3).

Two options for small budgets: ``patch_size`` folds p x p pixel patches into channels before the first
convolution (the patch size of DiT, Peebles & Xie 2023, and U-ViT), and ``text_map_channels`` lets the
pooled prompt write a spatial map into the bottleneck, the way a GAN generator's first layer does.

The network only predicts; the scheduler (``scheduler.py``) owns the mathematics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from labs.text_encoder import TextEncoding


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
    return_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""$\mathrm{softmax}(QK^\top/\sqrt{d_k} + M)\,V$ (Vaswani et al. 2017, eq. 1).

    q: (B, nh, Tq, hs), k and v: (B, nh, Tk, hs), mask: bool broadcastable to (B, nh, Tq, Tk),
    True = "may attend". Returns ((B, nh, Tq, hs), weights (B, nh, Tq, Tk) or None).
    The explicit version runs when the weights are wanted (attention maps); otherwise the
    fused ``F.scaled_dot_product_attention`` computes the same thing faster.
    """
    if not return_weights:
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            # Under CPU bf16 autocast, in fp32: at these sizes (64-256 queries, 12-256 keys, 32 channels a head)
            # PyTorch's fused bf16 CPU kernel, its backward above all, ran 1.5-8x slower than the fp32 one
            # (and 2-5x slower than the fp32 step's whole attention), while convolutions ran 2x faster in bf16
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
            return y.to(q.dtype), None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask), None
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # QK^T / sqrt(d_k): (B, nh, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # + M: masked keys get weight 0
    weights = scores.softmax(dim=-1)  # (B, nh, Tq, Tk), rows sum to 1
    return weights @ v, weights  # (B, nh, Tq, hs)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    r"""Sinusoidal embedding of the noise level (Vaswani et al. sec. 3.5; Ho et al. appendix B):
    $[\cos(t\,\omega_i), \sin(t\,\omega_i)]$ with $\omega_i = \mathrm{max\_period}^{-i/(d/2)}$. (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)  # omega_i, (half,)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class ResBlock(nn.Module):
    r"""GroupNorm -> SiLU -> conv, then AdaGN: $h \leftarrow \mathrm{GN}(h)(1 + s) + b$ with
    $(s, b) = \mathrm{Linear}(\mathrm{emb})$, -> SiLU -> dropout -> conv, plus the skip connection."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels)  # (scale, shift) per channel
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # the block starts as the identity (skip only)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x: (B, Cin, H, W), emb: (B, E) -> (B, Cout, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))  # (B, Cout, H, W)
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # 2 x (B, Cout, 1, 1)
        h = self.norm2(h) * (1 + scale) + shift  # AdaGN
        h = self.conv2(self.dropout(F.silu(h)))  # (B, Cout, H, W)
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, residual."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        if channels % heads != 0:
            raise ValueError(f"channels={channels} must be divisible by heads={heads}")
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)  # W^Q, W^K, W^V in one matmul
        self.proj = nn.Linear(channels, channels)  # W^O
        nn.init.zeros_(self.proj.weight)  # starts as the identity
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(h).split(C, dim=-1)  # 3 x (B, HW, C)
        q, k, v = (a.view(B, H * W, self.heads, C // self.heads).transpose(1, 2) for a in (q, k, v))  # (B, nh, HW, hs)
        y, _ = attention(q, k, v)  # (B, nh, HW, hs)
        y = y.transpose(1, 2).reshape(B, H * W, C)  # re-assemble heads: (B, HW, C)
        return x + self.proj(y).transpose(1, 2).view(B, C, H, W)  # (B, C, H, W)


class CrossAttention(nn.Module):
    r"""Image positions attend to the prompt's tokens (Rombach et al. eq. 2):
    $Q = W^Q \mathrm{GN}(h)$, $K = W^K c$, $V = W^V c$, with $c$ the text encoder's token states
    and [PAD] tokens masked out. Set ``store_attention = True`` to keep the last weights in
    ``self.attention_weights``, (B, nh, H*W, L): where each word is looked at."""

    def __init__(self, channels: int, cond_dim: int, heads: int, groups: int):
        super().__init__()
        if channels % heads != 0:
            raise ValueError(f"channels={channels} must be divisible by heads={heads}")
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.to_q = nn.Linear(channels, channels)  # W^Q
        self.to_kv = nn.Linear(cond_dim, 2 * channels)  # W^K, W^V from the text states
        self.proj = nn.Linear(channels, channels)  # W^O
        nn.init.zeros_(self.proj.weight)  # starts as the identity
        nn.init.zeros_(self.proj.bias)
        self.store_attention = False
        self.attention_weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, context: TextEncoding) -> torch.Tensor:
        """x: (B, C, H, W); context.tokens: (B, L, D), context.mask: (B, L) True on real tokens."""
        B, C, H, W = x.shape
        L = context.tokens.size(1)
        hs = C // self.heads
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q = self.to_q(h).view(B, H * W, self.heads, hs).transpose(1, 2)  # (B, nh, HW, hs)
        k, v = self.to_kv(context.tokens.to(h.dtype)).split(C, dim=-1)  # 2 x (B, L, C)
        k = k.view(B, L, self.heads, hs).transpose(1, 2)  # (B, nh, L, hs)
        v = v.view(B, L, self.heads, hs).transpose(1, 2)  # (B, nh, L, hs)
        mask = context.mask[:, None, None, :]  # (B, 1, 1, L): [PAD] keys get weight 0
        y, weights = attention(q, k, v, mask, return_weights=self.store_attention)  # (B, nh, HW, hs)
        self.attention_weights = None if weights is None else weights.detach()  # (B, nh, HW, L)
        y = y.transpose(1, 2).reshape(B, H * W, C)  # (B, HW, C)
        return x + self.proj(y).transpose(1, 2).view(B, C, H, W)  # (B, C, H, W)


class UNetBlock(nn.Module):
    """A residual block, then optionally self-attention, then optionally cross-attention."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, cond_dim: int, heads: int,
                 groups: int, dropout: float, self_attention: bool, cross_attention: bool):
        super().__init__()
        self.res = ResBlock(in_channels, out_channels, emb_dim, groups, dropout)
        self.self_attn = SelfAttention(out_channels, heads, groups) if self_attention else None
        self.cross_attn = CrossAttention(out_channels, cond_dim, heads, groups) if cross_attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: TextEncoding) -> torch.Tensor:
        h = self.res(x, emb)  # (B, Cout, H, W)
        if self.self_attn is not None:
            h = self.self_attn(h)
        if self.cross_attn is not None:
            h = self.cross_attn(h, context)
        return h


class Downsample(nn.Module):
    """Stride-2 3x3 convolution: (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to ``size`` (the skip's size, so odd sizes like 7 work), then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


@dataclass
class UNetConfig:
    base_channels: int = 32  # channels at full resolution; level i has base_channels * channel_mults[i]
    # one level per entry, halving H, W: 32 -> 64 -> 64 channels at 32, 16, 8 px
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1  # residual blocks per level on the way down (one more on the way up)
    # levels (0 = full res) with self-attention: level 2 = 8x8 px (plus the middle block, always)
    self_attention_levels: list[int] = field(default_factory=lambda: [2])
    # levels with cross-attention, where the words meet the image: 16x16 and 8x8 px
    cross_attention_levels: list[int] = field(default_factory=lambda: [1, 2])
    heads: int = 4  # attention heads (self and cross)
    groups: int = 8  # GroupNorm groups; must divide every level's channels
    emb_mult: int = 4  # time/text embedding width = emb_mult * base_channels
    dropout: float = 0.0
    # Two extra input channels holding x and y in [-1, 1] (CoordConv, Liu et al. 2018): convolutions are
    # translation-equivariant, so without them "at the top left" reaches the network only through padding.
    # Off in a plain UNetConfig(); every family that uses the UNet turns it on (DDPMConfig.unet, FlowConfig.unet,
    # the ldm's latent_ddpm).
    coord_channels: bool = False
    # Pixels per side of a patch: the image is folded into (C * p^2, H / p, W / p) before the first conv and
    # unfolded after the last (pixel_unshuffle / pixel_shuffle, the "patch size" of DiT and U-ViT), so every
    # level runs at 1 / p^2 of the positions. 1 = plain pixels.
    patch_size: int = 1
    # A spatial "where" map from the pooled prompt, added at the lowest resolution: Linear(pooled) -> (k, s, s),
    # resized to the bottleneck, 1x1 conv to its channels (k = text_map_channels, s = text_map_size; 0 = off).
    # The GAN and the VAE decoder start from a Linear(text) -> 4x4 map, so a prompt writes *where* directly into
    # space; a UNet otherwise gets the pooled prompt only as a per-channel scale and shift (no spatial extent) and
    # through cross-attention, whose queries must first learn where they are. See conf/preset_model/ddpm_cpu.yaml.
    text_map_channels: int = 0
    text_map_size: int = 8

    def __post_init__(self) -> None:
        for name in ("base_channels", "num_res_blocks", "heads", "groups", "emb_mult", "patch_size", "text_map_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"unet.{name} must be >= 1, got {getattr(self, name)}")
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise ValueError(f"unet.channel_mults must be a non-empty list of positive ints, got {self.channel_mults}")
        for name in ("self_attention_levels", "cross_attention_levels"):
            bad = [level for level in getattr(self, name) if not 0 <= level < len(self.channel_mults)]
            if bad:
                raise ValueError(f"unet.{name} has levels {bad} outside 0..{len(self.channel_mults) - 1}")
        for mult in self.channel_mults:
            channels = self.base_channels * mult
            if channels % self.groups or channels % self.heads:
                raise ValueError(f"unet: {channels} channels (base_channels * {mult}) must be divisible by "
                                 f"groups={self.groups} and heads={self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"unet.dropout must be in [0, 1), got {self.dropout}")
        if self.text_map_channels < 0:
            raise ValueError(f"unet.text_map_channels must be >= 0 (0 = off), got {self.text_map_channels}")


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    r"""(B, C, H, W) -> (B, C p^2, H / p, W / p): every p x p patch folded into channels, pixel (i, j) of the patch
    at channel c p^2 + i p + j (``pixel_unshuffle``; DiT's and simple diffusion's patchify). A fixed, lossless
    reshuffle: nothing is learnt, unlike the ldm's encoder, which compresses 3 x 4 x 4 values to 4 and must be trained."""
    return F.pixel_unshuffle(x, p) if p > 1 else x


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of :func:`patchify`: (B, C p^2, H, W) -> (B, C, H p, W p) (``pixel_shuffle``)."""
    return F.pixel_shuffle(x, p) if p > 1 else x


def coordinate_grid(x: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W): channel 0 is the column (x) and channel 1 the row (y), each from -1 to 1."""
    B, _, H, W = x.shape
    ys = torch.linspace(-1.0, 1.0, H, device=x.device, dtype=x.dtype).view(1, 1, H, 1).expand(B, 1, H, W)
    xs = torch.linspace(-1.0, 1.0, W, device=x.device, dtype=x.dtype).view(1, 1, 1, W).expand(B, 1, H, W)
    return torch.cat([xs, ys], dim=1)


class UNet(nn.Module):
    r"""$\epsilon_\theta(x_t, t, c)$ (or $v_\theta$): (B, C, H, W), (B,), TextEncoding -> (B, C, H, W)."""

    def __init__(self, cfg: UNetConfig, image_channels: int, cond_dim: int):
        super().__init__()
        self.cfg = cfg
        ch = cfg.base_channels
        emb_dim = cfg.emb_mult * ch
        levels = len(cfg.channel_mults)

        def block(in_ch: int, out_ch: int, level: int) -> UNetBlock:
            return UNetBlock(in_ch, out_ch, emb_dim, cond_dim, cfg.heads, cfg.groups, cfg.dropout,
                             level in cfg.self_attention_levels, level in cfg.cross_attention_levels)

        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.cond_proj = nn.Linear(cond_dim, emb_dim)  # pooled text vector -> added to the time embedding
        p2 = cfg.patch_size ** 2
        self.conv_in = nn.Conv2d(image_channels * p2 + (2 if cfg.coord_channels else 0), ch, 3, padding=1)

        # down path: remember the channels of every tensor pushed on the skip stack
        skip_channels, channels = [ch], ch
        self.down_blocks, self.downsamples = nn.ModuleList(), nn.ModuleList()
        for level, mult in enumerate(cfg.channel_mults):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(block(channels, ch * mult, level))
                channels = ch * mult
                skip_channels.append(channels)
            self.down_blocks.append(blocks)
            if level < levels - 1:
                self.downsamples.append(Downsample(channels))
                skip_channels.append(channels)

        # the prompt's "where" map, added at the lowest resolution (see UNetConfig.text_map_channels)
        k, side = cfg.text_map_channels, cfg.text_map_size
        self.text_map = nn.Linear(cond_dim, k * side * side) if k else None
        self.text_map_out = nn.Conv2d(k, channels, 1) if k else None
        if self.text_map_out is not None:
            nn.init.zeros_(self.text_map_out.weight)  # starts as no change
            nn.init.zeros_(self.text_map_out.bias)

        # middle, at the lowest resolution: attention there is cheap
        last = levels - 1
        self.mid = nn.ModuleList([
            UNetBlock(channels, channels, emb_dim, cond_dim, cfg.heads, cfg.groups, cfg.dropout, True,
                      last in cfg.cross_attention_levels),
            block(channels, channels, last),
        ])

        # up path: one more block per level, each eating one skip
        self.up_blocks, self.upsamples = nn.ModuleList(), nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(block(channels + skip_channels.pop(), ch * mult, level))
                channels = ch * mult
            self.up_blocks.append(blocks)
            if level > 0:
                self.upsamples.append(Upsample(channels))

        self.norm_out = nn.GroupNorm(cfg.groups, channels)
        self.conv_out = nn.Conv2d(channels, image_channels * p2, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # predicts 0 at init
        nn.init.zeros_(self.conv_out.bias)

    def cross_attention_modules(self) -> dict[str, CrossAttention]:
        """Every cross-attention layer by its module name (for attention maps)."""
        return {name: module for name, module in self.named_modules() if isinstance(module, CrossAttention)}

    def forward(self, xt: torch.Tensor, t: torch.Tensor, context: TextEncoding) -> torch.Tensor:
        # emb = MLP(sinusoid(t)) + W pooled(c)
        emb = self.time_mlp(timestep_embedding(t, self.cfg.base_channels)) \
            + self.cond_proj(context.pooled.to(xt.dtype))  # (B, E)
        p = self.cfg.patch_size
        if xt.shape[-1] % p or xt.shape[-2] % p:
            raise ValueError(f"image size {tuple(xt.shape[-2:])} is not a multiple of unet.patch_size={p}")
        xt = patchify(xt, p)  # (B, C p^2, H / p, W / p): each p x p patch as channels
        if self.cfg.coord_channels:
            xt = torch.cat([xt, coordinate_grid(xt)], dim=1)  # (B, C p^2 + 2, H / p, W / p)
        h = self.conv_in(xt)  # (B, ch, H / p, W / p)
        skips = [h]
        for level, blocks in enumerate(self.down_blocks):
            for block in blocks:
                h = block(h, emb, context)  # (B, ch * mult, H_level, W_level)
                skips.append(h)
            if level < len(self.downsamples):
                h = self.downsamples[level](h)  # (B, C, H/2, W/2)
                skips.append(h)
        if self.text_map is not None:
            side = self.cfg.text_map_size
            where = self.text_map(context.pooled.to(h.dtype)).view(-1, self.cfg.text_map_channels, side, side)
            if where.shape[-2:] != h.shape[-2:]:
                where = F.interpolate(where, size=h.shape[-2:], mode="bilinear", align_corners=False)
            h = h + self.text_map_out(where)  # (B, C, H_low, W_low)
        for block in self.mid:
            h = block(h, emb, context)
        for i, blocks in enumerate(self.up_blocks):
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb, context)  # concat skip: (B, C + C_skip, H, W)
            if i < len(self.upsamples):
                h = self.upsamples[i](h, size=skips[-1].shape[-2:])  # (B, C, 2H, 2W)
        out = self.conv_out(F.silu(self.norm_out(h)))  # (B, C_image p^2, H / p, W / p)
        return unpatchify(out, p)  # (B, C_image, H, W)
