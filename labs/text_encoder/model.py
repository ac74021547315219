"""A small pre-LN Transformer encoder for captions, shared by every conditional model.

Written from scratch, bottom-up (attention, MLP, block, config, encoder), after
nanoGPT's ``model.py`` but bidirectional: every token attends to every *real* token of its
prompt, and a key-padding mask keeps [PAD] positions out of the attention
(Vaswani et al. 2017, "Attention Is All You Need", eq. 1; pre-LN as in GPT-2).

The output is a :class:`TextEncoding`: per-token states (for cross-attention), the mask,
and a pooled vector (the masked mean over real tokens, for FiLM/adaptive-norm conditioning
or a projection discriminator). Padding never changes the states of real tokens nor the
pooled vector, so a prompt encodes the same alone or in a batch with longer prompts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .tokenizer import Tokenizer


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    r"""$\mathrm{Attention}(Q, K, V) = \mathrm{softmax}(QK^\top / \sqrt{d_k} + M)\,V$ (Vaswani et al. eq. 1).

    q: (..., Tq, dk), k: (..., Tk, dk), v: (..., Tk, dv) -> (..., Tq, dv).
    ``mask`` is boolean, broadcastable to (..., Tq, Tk), True = "may attend". It plays the
    role of $M$: 0 where True, $-\infty$ where False, so a masked key gets exactly zero
    weight. A key-padding mask of shape (B, Tk) is passed as ``mask[:, None, None, :]``
    for (B, nh, Tq, Tk) scores. We fill with the dtype's most negative finite value rather
    than -inf, so a query whose keys are all masked gets uniform weights instead of NaN
    (the encoder never produces one: [CLS] is always a real key).
    """
    d_k = q.size(-1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)  # QK^T / sqrt(d_k): (..., Tq, Tk)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = attend), got {mask.dtype}")
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)  # + M
    weights = scores.softmax(dim=-1)  # (..., Tq, Tk), each row sums to 1 over attended keys
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v  # (..., Tq, Tk) x (..., Tk, dv) -> (..., Tq, dv)


class MultiHeadSelfAttention(nn.Module):
    r"""$\mathrm{MultiHead}(X) = \mathrm{Concat}(\mathrm{head}_1, \dots, \mathrm{head}_h) W^O$,
    $\mathrm{head}_i = \mathrm{Attention}(X W_i^Q, X W_i^K, X W_i^V)$."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)  # W^Q, W^K, W^V of all heads, in one matmul
        self.proj = nn.Linear(dim, dim)  # W^O
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, C); mask: (B, T) bool key-padding mask, True on real tokens -> (B, T, C)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)
        key_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, T), over queries
        dropout_p = self.dropout if self.training else 0.0
        y = scaled_dot_product_attention(q, k, v, key_mask, dropout_p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network: Linear -> GELU -> Linear."""

    def __init__(self, dim: int, mlp_ratio: int, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(dim, mlp_ratio * dim)
        self.act = nn.GELU()
        self.proj = nn.Linear(mlp_ratio * dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))  # (B, T, C)


class Block(nn.Module):
    """Pre-LN Transformer block: $x \\leftarrow x + \\mathrm{MHSA}(\\mathrm{LN}(x))$, then
    $x \\leftarrow x + \\mathrm{MLP}(\\mathrm{LN}(x))$."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, dropout: float = 0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, heads, dropout)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


@dataclass
class TextEncoderConfig:
    dim: int = 128  # C, width of every token state and of the pooled vector
    depth: int = 2  # number of Transformer blocks
    heads: int = 4  # attention heads; head size hs = dim // heads
    max_length: int = 24  # longest token sequence ([CLS] included); size of the position table
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * dim
    dropout: float = 0.0  # on embeddings, attention weights and residual branches

    def __post_init__(self) -> None:
        for name in ("dim", "depth", "heads", "max_length", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TextEncoderConfig.{name} must be a positive int, got {value!r}")
        if self.dim % self.heads != 0:
            raise ValueError(f"TextEncoderConfig.dim={self.dim} must be divisible by heads={self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TextEncoderConfig.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TextEncoding:
    """What conditional models receive."""

    tokens: torch.Tensor  # (B, L, C) per-token states (padded positions present but meaningless)
    mask: torch.Tensor  # (B, L) bool, True on real tokens
    pooled: torch.Tensor  # (B, C) masked mean of `tokens` over real tokens


class TextEncoder(nn.Module):
    """Token + learned position embeddings, ``depth`` pre-LN blocks, a final LayerNorm."""

    def __init__(self, cfg: TextEncoderConfig, vocab_size: int):
        super().__init__()
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.tok_emb = nn.Embedding(vocab_size, cfg.dim)
        self.pos_emb = nn.Embedding(cfg.max_length, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth)
        )
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.frozen = False  # see freeze()
        self.apply(self._init_weights)
        # GPT-2 init: residual projections scaled by 1/sqrt(2 * depth), one per residual add
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * cfg.depth))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def freeze(self) -> "TextEncoder":
        """Fixed weights from now on, as Stable Diffusion keeps CLIP's text encoder (Rombach et al. 2022, sec. 4.3):
        no gradients, and eval mode even while the model around it trains (``train()`` leaves it in eval)."""
        self.frozen = True
        self.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> "TextEncoder":
        return super().train(mode and not self.frozen)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> TextEncoding:
        """ids: (B, L) long token ids; mask: (B, L) bool, True on real tokens (default: all real)."""
        if ids.dim() != 2:
            raise ValueError(f"ids must have shape (B, L), got {tuple(ids.shape)}")
        B, L = ids.shape
        if L > self.cfg.max_length:
            raise ValueError(
                f"sequence length {L} exceeds TextEncoderConfig.max_length={self.cfg.max_length} "
                f"(the tokenizer should truncate prompts first)"
            )
        if mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        if mask.shape != ids.shape or mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be a bool tensor of shape {tuple(ids.shape)}, got {mask.dtype} {tuple(mask.shape)}"
            )
        pos = torch.arange(L, device=ids.device)  # (L,)
        x = self.drop(self.tok_emb(ids) + self.pos_emb(pos))  # (B, L, C) + (L, C) -> (B, L, C)
        for block in self.blocks:
            x = block(x, mask)  # (B, L, C)
        tokens = self.ln_f(x)  # (B, L, C)
        # pooled = sum_l m_l h_l / sum_l m_l: padding contributes nothing
        weights = mask.to(tokens.dtype).unsqueeze(-1)  # (B, L, 1)
        pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # (B, C)
        return TextEncoding(tokens=tokens, mask=mask, pooled=pooled)


def encode_prompts(
    tokenizer: Tokenizer,
    encoder: TextEncoder,
    prompts: str | list[str],
    device: torch.device | str | None = None,
) -> TextEncoding:
    """Tokenize ``prompts`` and encode them in one go (device defaults to the encoder's)."""
    if tokenizer.max_length > encoder.cfg.max_length:
        raise ValueError(
            f"tokenizer.max_length={tokenizer.max_length} exceeds the encoder's "
            f"max_length={encoder.cfg.max_length}"
        )
    if tokenizer.vocab_size != encoder.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the encoder was built for {encoder.vocab_size}"
        )
    if device is None:
        device = encoder.tok_emb.weight.device
    ids, mask = tokenizer(prompts, device=device)  # (B, L), (B, L)
    return encoder(ids, mask)
