"""Checks for the text-encoder exercises (notebook 00): a padded batch and its key-padding mask, scaled
dot-product attention, and multi-head self-attention.

Each check compares the student's code with the lab's own (``Tokenizer.__call__``,
:func:`~labs.text_encoder.scaled_dot_product_attention`, :class:`~labs.text_encoder.MultiHeadSelfAttention`),
which raises while the student's code runs, so an answer that calls it fails.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from labs.text_encoder import MultiHeadSelfAttention, TokenBatch, Tokenizer, scaled_dot_product_attention

from lab_utils.core.exercises.cases import Case, Hint
from lab_utils.core.exercises.checks import CheckResult, check_function, check_module
from lab_utils.core.exercises.records import case_seed, graded


# --------------------------------------------------------------------------- a padded batch and its mask

PADDED_BATCH_HINT = Hint(
    "Each prompt encodes to a list of ids of its own length, but a batch is a rectangle: the shorter prompts are "
    "filled up at the end with the padding token, and the mask tells the model which positions hold a real token.",
    "Encode every prompt with `tokenizer.encode`; the batch is as long as its longest prompt (not the tokenizer's "
    "max_length); append the id `tokenizer.PAD_ID` to each shorter list until it has that length and make a long "
    "tensor of shape (B, L); the mask is a bool tensor of the same shape, True on every position that is not padding "
    "([CLS] included).",
)

# a small vocabulary of caption words (the dataset's own comes from its captions)
_WORDS = ["a", "at", "big", "blue", "bottom", "circle", "left", "red", "small", "square", "the", "top", "triangle"]


def _tokenizer(max_length: int = 12) -> Tokenizer:
    """The exercise's tokenizer; in a grading run its words come in an order drawn for the run (other ids)."""
    order = torch.randperm(len(_WORDS), generator=torch.Generator().manual_seed(case_seed(0))).tolist()
    words = _WORDS if case_seed(0) == 0 else [_WORDS[i] for i in order]
    return Tokenizer(list(Tokenizer.SPECIALS) + words, max_length=max_length)


def padded_batch_cases() -> list[Case]:
    """Batches of prompts of different lengths (the empty prompt, an unknown word, a batch of one)."""
    tokenizer = _tokenizer()
    return [
        Case((tokenizer, ["a red circle", "a small blue square at the top left", "a big triangle"]),
             label="three prompts of different lengths"),
        Case((tokenizer, ["a blue square at the bottom", "red"]), label="the longest prompt first"),
        Case((tokenizer, ["", "a pink circle"]), label="the empty prompt ([CLS] only) and an unknown word"),
        Case((tokenizer, ["a small red circle"]), label="one prompt: nothing to pad"),
    ]


def lab_padded_batch(tokenizer: Tokenizer, prompts: list[str]) -> TokenBatch:
    """The lab's padded batch, ``tokenizer(prompts)``, with the exercise's signature."""
    return tokenizer(list(prompts))


def _pad(tokenizer: Tokenizer, prompts: list[str], length: int | None = None, left: bool = False) -> TokenBatch:
    encoded = [tokenizer.encode(prompt) for prompt in prompts]
    length = length or max(len(ids) for ids in encoded)
    rows = [[tokenizer.PAD_ID] * (length - len(ids)) + ids if left else ids + [tokenizer.PAD_ID] * (length - len(ids))
            for ids in encoded]
    ids = torch.tensor(rows, dtype=torch.long)  # (B, L)
    return TokenBatch(ids, ids != tokenizer.PAD_ID)


def _mask_inverted(tokenizer, prompts):
    ids, mask = _pad(tokenizer, prompts)
    return TokenBatch(ids, ~mask)


def _mask_all_real(tokenizer, prompts):
    ids, _ = _pad(tokenizer, prompts)
    return TokenBatch(ids, torch.ones_like(ids, dtype=torch.bool))


def _padded_to_max_length(tokenizer, prompts):
    return _pad(tokenizer, prompts, length=tokenizer.max_length)


def _padded_on_the_left(tokenizer, prompts):
    return _pad(tokenizer, prompts, left=True)


PADDED_BATCH_MISTAKES: list[tuple[Callable, str]] = [
    (_mask_inverted, "it matches the right ids with the mask inverted — the mask is True on the real tokens and "
                     "False on the padding"),
    (_mask_all_real, "it matches the right ids with the mask True everywhere — the padded positions are not real "
                     "tokens"),
    (_padded_to_max_length, "it matches a batch padded to the tokenizer's max_length — pad only up to the longest "
                            "prompt of this batch"),
    (_padded_on_the_left, "it matches padding at the start of each prompt — [CLS] comes first, the padding goes at "
                          "the end"),
]


@graded("padded_batch")
def check_padded_batch(fn: Callable, name: str = "padded_batch") -> CheckResult:
    """Check a student's ``fn(tokenizer, prompts) -> (ids, mask)`` against the lab's ``tokenizer(prompts)``
    (``Tokenizer.__call__``, which raises while ``fn`` runs: ``tokenizer.encode`` is allowed)."""
    return check_function(
        fn, lab_padded_batch, padded_batch_cases(), name=name, hint=PADDED_BATCH_HINT,
        known_mistakes=PADDED_BATCH_MISTAKES, forbid=(lab_padded_batch, _pad, (Tokenizer, "__call__")),
    )


# --------------------------------------------------------------------------- scaled dot-product attention

ATTENTION_HINT = Hint(
    "Each query's output is an average of the values, weighted by how well the query matches each key: score every "
    "query against every key, scale the scores so that they do not grow with the key size, and turn each query's "
    "scores into weights that sum to one over the keys. A masked-out key must get no weight at all.",
    "The scores are the matrix product of the queries with the keys transposed on their last two dimensions, "
    "divided by the square root of d_k (the size of the last dimension of q). Where the mask is False, replace the "
    "score by a very negative number before the softmax; the softmax runs over the last dimension (the keys). "
    "Multiplying the weights by the values gives (..., Tq, dv).",
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
    gen = torch.Generator().manual_seed(case_seed(seed))

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


def _attention_mask_inverted(q, k, v, mask=None):
    return scaled_dot_product_attention(q, k, v, None if mask is None else ~mask)


def _attention_mask_inverted_inf(q, k, v, mask=None):
    """The same with -inf as the fill: a query whose keys are all real gets NaN weights."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (..., Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def _softmax_over_queries(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (..., Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores.softmax(dim=-2) @ v


ATTENTION_MISTAKES: list[tuple[Callable, str]] = [
    (_no_scale, "it matches attention *without* the 1/sqrt(d_k) scaling — divide the scores by the square root of "
                "the key size d_k"),
    (_scale_by_d, "it matches scores divided by d_k — the scale is 1/sqrt(d_k), one over the square root of the key "
                  "size"),
    (_mask_ignored, "it matches attention that ignores the mask — give the scores where the mask is False a very "
                    "negative value before the softmax, so those keys get no weight"),
    (_attention_mask_inverted, "it matches attention with the mask inverted — True means 'may attend': it is the "
                               "False positions that must get no weight"),
    (_attention_mask_inverted_inf, "it matches attention with the mask inverted — True means 'may attend': it is "
                                   "the False positions that must get no weight"),
    (_softmax_over_queries, "it matches a softmax over the queries — each query's weights must sum to one over the "
                            "keys (the last dimension)"),
]


@graded("attention")
def check_attention(fn: Callable, name: str = "attention") -> CheckResult:
    """Check a student's ``fn(q, k, v, mask=None)`` against
    :func:`labs.text_encoder.scaled_dot_product_attention` on fixed seeded inputs
    ((B, T, d) and multi-head (B, H, T, d) shapes, Tq != Tk, d_v != d_k, key-padding masks).
    The lab's function and torch's ``F.scaled_dot_product_attention`` raise while ``fn`` runs.
    """
    return check_function(
        fn, scaled_dot_product_attention, attention_cases(), name=name, hint=ATTENTION_HINT,
        known_mistakes=ATTENTION_MISTAKES,
        forbid=(scaled_dot_product_attention, (F, "scaled_dot_product_attention")),
    )


# --------------------------------------------------------------------------- multi-head self-attention

MULTI_HEAD_HINT = Hint(
    "The width C is cut into `heads` slices of C // heads features; each slice is its own attention over the same "
    "tokens, the heads' outputs are put side by side again and mixed by the output projection. The key-padding "
    "mask is the same for every head and every query.",
    "Project x with `self.qkv` and cut the result into q, k and v along the last dimension, in that order; turn "
    "each from (B, T, C) into (B, heads, T, C // heads) (view it as (B, T, heads, C // heads), then swap the T and "
    "heads dimensions); give the (B, T) mask singleton dimensions for heads and queries, (B, 1, 1, T); attend; swap "
    "the dimensions back, make the tensor contiguous and view it as (B, T, C); finish with `self.proj`.",
)
MULTI_HEAD_INIT = Case((16, 4), label="dim 16, 4 heads")


def multi_head_cases(seed: int = 0) -> list[Case]:
    """(B, T, C) inputs for a layer of width 16 with 4 heads, with and without a (B, T) key-padding mask."""
    gen = torch.Generator().manual_seed(case_seed(seed))
    dim = MULTI_HEAD_INIT.args[0]
    return [
        Case((torch.randn(2, 5, dim, generator=gen),), label="(B, T, C) = (2, 5, 16), no mask"),
        Case((torch.randn(2, 5, dim, generator=gen),), {"mask": _key_padding_mask([3, 5], 5)},
             label="key-padding mask (B, T) for prompts of 3 and 5 tokens"),
        Case((torch.randn(1, 7, dim, generator=gen),), {"mask": _key_padding_mask([6], 7)},
             label="one prompt of 6 tokens padded to 7"),
    ]


@graded("multi_head_attention")
def check_multi_head_attention(cls: Callable, name: str = "multi_head_attention") -> CheckResult:
    """Check a student's layer class ``cls(dim, heads)`` with submodules ``qkv`` (C -> 3C) and ``proj`` (C -> C)
    and ``forward(x, mask=None)`` against :class:`labs.text_encoder.MultiHeadSelfAttention` (whose weights it gets;
    its ``forward`` raises while the student's layer runs)."""
    return check_module(cls, MultiHeadSelfAttention, MULTI_HEAD_INIT, multi_head_cases(), name=name,
                        hint=MULTI_HEAD_HINT)
