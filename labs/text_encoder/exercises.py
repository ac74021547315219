"""Checks for the text-encoder exercises (notebook 00)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from labs.text_encoder import scaled_dot_product_attention

from lab_utils.exercises import Case, check_function

ATTENTION_HINT = (
    "weights = softmax(q @ k.transpose(-2, -1) / sqrt(d_k)) over the last dim (the keys), "
    "with masked-out scores (mask == False) set to a very negative number before the softmax; "
    "return weights @ v"
)


def _key_padding_mask(lengths: list[int], length: int) -> torch.Tensor:
    """(B, L) bool, True on the first ``lengths[b]`` positions of row b (the real tokens)."""
    return torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]  # (B, L)


def attention_cases(seed: int = 0) -> list[Case]:
    """Fixed inputs for the attention exercise, from a seeded generator.

    Masks follow the reference's convention: boolean, True = "may attend", broadcastable to
    the (..., Tq, Tk) scores; a key-padding mask (B, Tk) comes as ``mask[:, None, :]`` for
    (B, T, d) inputs and ``mask[:, None, None, :]`` for multi-head (B, H, T, d) inputs.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=gen)

    B, H, T, d = 2, 3, 5, 8
    x = randn(B, T, d)
    cases = [
        Case((randn(B, T, d), randn(B, T, d), randn(B, T, d)), label="(B, T, d) inputs, no mask"),
        Case((x, x, x), label="self-attention, q = k = v"),
        Case((randn(B, T, d, scale=2.0), randn(B, T, d, scale=2.0), randn(B, T, 6)),
             label="value size 6 != key size 8"),
        Case((randn(B, 3, d), randn(B, 7, d), randn(B, 7, d)),
             label="3 queries, 7 keys (cross-attention shapes)"),
    ]

    # key-padding mask: prompts of 3 and 5 real tokens; padded values are huge, so any weight
    # given to a padded key shows
    pad = _key_padding_mask([3, 5], T)  # (B, T)
    v = randn(B, T, d)
    v[~pad] = 100.0
    cases.append(Case((randn(B, T, d), randn(B, T, d), v), {"mask": pad[:, None, :]},  # (B, 1, T)
                      label="key-padding mask of shape (B, 1, T)"))

    # multi-head: (B, H, T, d) with the key-padding mask broadcast over heads and queries
    v = randn(B, H, T, d)
    v.masked_fill_(~pad[:, None, :, None], -50.0)  # (B, 1, T, 1) over heads and features
    cases.append(Case((randn(B, H, T, d), randn(B, H, T, d), v), {"mask": pad[:, None, None, :]},  # (B, 1, 1, T)
                      label="multi-head (B, H, T, d) with mask (B, 1, 1, T)"))
    return cases


# Wrong versions we recognise, to give a precise hint (each is a common first attempt).
def _no_scale(q, k, v, mask=None):
    return scaled_dot_product_attention(q * math.sqrt(q.size(-1)), k, v, mask)


def _scale_by_d(q, k, v, mask=None):
    return scaled_dot_product_attention(q / math.sqrt(q.size(-1)), k, v, mask)


def _mask_ignored(q, k, v, mask=None):
    return scaled_dot_product_attention(q, k, v, None)


def _mask_inverted(q, k, v, mask=None):
    return scaled_dot_product_attention(q, k, v, None if mask is None else ~mask)


def _softmax_over_queries(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (..., Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores.softmax(dim=-2) @ v


ATTENTION_MISTAKES: list[tuple[Callable, str]] = [
    (_no_scale, "it matches attention *without* the 1/sqrt(d_k) scaling — divide the scores by math.sqrt(d_k)"),
    (_scale_by_d, "it matches scores divided by d_k — the scale is 1/sqrt(d_k), not 1/d_k"),
    (_mask_ignored, "it matches attention that ignores the mask — set scores where mask is False to a very "
                    "negative number (scores.masked_fill(~mask, float('-inf'))) before the softmax"),
    (_mask_inverted, "it matches attention with the mask inverted — True means 'may attend', so fill where ~mask"),
    (_softmax_over_queries, "it matches a softmax over the queries — the softmax runs over the keys (dim=-1)"),
]


def check_attention(fn: Callable, name: str = "attention") -> bool:
    """Check a student's ``fn(q, k, v, mask=None)`` against
    :func:`labs.text_encoder.scaled_dot_product_attention` on fixed seeded inputs
    ((B, T, d) and multi-head (B, H, T, d) shapes, Tq != Tk, d_v != d_k, key-padding masks).
    """
    return check_function(
        fn, scaled_dot_product_attention, attention_cases(), name=name, hint=ATTENTION_HINT,
        known_mistakes=ATTENTION_MISTAKES,
    )
