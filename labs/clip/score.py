"""How well images match their prompts, read through a joint embedding: the CLIP score and R-precision.

CLIP score. Hessel et al. 2021 ("CLIPScore", eq. 1) score an image v against a caption c as
$\\mathrm{CLIP\\text{-}S}(c, v) = w \\cdot \\max(\\cos(E_c, E_v), 0)$ with $w = 2.5$ (torchmetrics' ``CLIPScore``
uses $100 \\cdot \\max(\\cos, 0)$). genlab reports the mean cosine itself,

    $s = \\frac{1}{N} \\sum_i \\cos\\big(I_e(x_i), T_e(p_i)\\big) = \\frac{1}{N} \\sum_i I_e(x_i) \\cdot T_e(p_i)$

(unit embeddings), without the clip at 0 and without a scale: the two are the same figure wherever every cosine
is positive (multiply by 2.5 or 100 to read it on their scales), and a mean can only be compared with another
read through the same embedding, so ``genlab eval`` prints it beside the real images' score with their own
captions (the ceiling) and the real images' score against other items' captions (the floor).

R-precision (Xu et al. 2018, AttnGAN sec. 4): rank the image's own prompt among it and N distractor prompts by
cosine; the score is the share of images whose own prompt ranks first ($R = 1$ relevant text of $N + 1$; AttnGAN
uses 99 random other captions, chance 1/100). Here the N distractors of an item are first its **hard negatives**,
its canonical caption with one attribute changed (on ``shapes`` 2 + 7 + 1 + 8 = 18: another shape, colour, size or
position; on Fashion-MNIST the 9 other classes), then random other canonical captions of the dataset's attribute
grid, up to N in all (99 by default; fewer where the grid has fewer: Fashion-MNIST has 10 captions, so N = 9 and
chance is 1/10). ``r_precision_hard`` ranks the prompt among its hard negatives only (chance 1/19 on ``shapes``).
A tie counts against the image: its own prompt must score strictly above every distractor.

:class:`ClipScorer` is a frozen :class:`labs.clip.ClipLab` that reads uint8 images (quantised as the evaluation
quantises every set) and caches nothing between calls. This module is not imported by ``labs/clip/__init__.py``,
so it is no part of the trained model's key (``lab_utils.harness.cached_run.run_key``): changing how the score is
read does not retrain the scorer. Import it by its path, ``from labs.clip.score import ClipScorer``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from labs.clip.model import ClipLab


# ------------------------------------------------------------------------------------ the math
def prompt_cosines(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """(N, D) and (N, D) unit rows -> (N,) $\\cos(I_e(x_i), T_e(p_i)) = I_e(x_i) \\cdot T_e(p_i)$, pair by pair."""
    return (image_embeddings * text_embeddings).sum(dim=1)  # (N,)


def r_precision_hits(image_embeddings: torch.Tensor, own: torch.Tensor, distractors: torch.Tensor) -> torch.Tensor:
    """(N, D) images, (N, D) their own prompts and (N, K, D) K distractor prompts each -> (N,) bool: the own prompt
    scores strictly above every distractor (R-precision with R = 1 is the mean of this)."""
    own_score = prompt_cosines(image_embeddings, own)  # (N,)
    other = torch.einsum("nd,nkd->nk", image_embeddings, distractors)  # (N, K) I_e . T_e(d_k)
    return own_score > other.max(dim=1).values if other.shape[1] else torch.ones_like(own_score, dtype=torch.bool)


# ------------------------------------------------------------------------------------ the distractors
@dataclass
class Distractors:
    """The distractor prompts of N items, the same number for each: ``prompts[i]`` is item i's, its ``hard`` hard
    negatives (its caption with one attribute changed) first, then random other captions."""

    prompts: list[list[str]]  # N lists of K = hard + random captions
    hard: int  # hard negatives per item

    @property
    def count(self) -> int:
        """K, the distractors per item (chance R-precision is 1 / (K + 1))."""
        return len(self.prompts[0]) if self.prompts else 0


def distractor_prompts(dataset: Any, labels: torch.Tensor, count: int, seed: int) -> Distractors:
    """The distractors of items with ``labels`` (N, A) in ``dataset`` (its ``attributes`` and ``describe``, template
    0): every hard negative (the canonical caption with one attribute set to each of its other values:
    $\\sum_a (K_a - 1)$ of them), then ``count`` minus those random other captions of the attribute grid (each item
    its own seeded draw, without repeats), or as many as the grid has. Equal labels and seed give equal prompts, so
    real and generated sets of the same prompts meet the same distractors."""
    ranges = [range(len(values)) for values in dataset.attributes.values()]
    grid = list(dict.fromkeys(dataset.describe(list(combination), 0) for combination in itertools.product(*ranges)))
    generator = torch.Generator().manual_seed(seed)
    out, hard_count = [], None
    for row in labels.tolist():
        own = dataset.describe(row, 0)
        hard = [dataset.describe(row[:a] + [k] + row[a + 1:], 0)
                for a, values in enumerate(ranges) for k in values if k != row[a]]  # one attribute changed
        hard = [caption for caption in dict.fromkeys(hard) if caption != own]
        excluded = {own, *hard}
        others = [caption for caption in grid if caption not in excluded]
        fill = max(0, min(count - len(hard), len(others)))
        picked = torch.randperm(len(others), generator=generator)[:fill].tolist()
        out.append(hard + [others[j] for j in picked])
        hard_count = len(hard) if hard_count is None else min(hard_count, len(hard))
    if out and len({len(prompts) for prompts in out}) != 1:
        raise ValueError("items got different numbers of distractors (a dataset whose captions repeat across "
                         "labels); R-precision needs the same number for every item")
    return Distractors(prompts=out, hard=hard_count or 0)


# ------------------------------------------------------------------------------------ the scorer
@dataclass
class PromptMatch:
    """Per image: how its prompt scores against it (:meth:`ClipScorer.prompt_match`)."""

    cosine: torch.Tensor  # (N,) cos(I_e(x_i), T_e(p_i))
    hit: torch.Tensor  # (N,) bool: p_i ranks first among it and its K distractors
    hit_hard: torch.Tensor  # (N,) bool: p_i ranks first among it and its hard negatives
    margin: torch.Tensor  # (N,) cos with p_i minus the best distractor's (> 0: a hit)

    def summary(self) -> dict[str, float]:
        """The set's figures: the CLIP score (mean cosine) and its spread, R-precision, R-precision on hard
        negatives."""
        return {"clip_score": self.cosine.mean().item(), "clip_score_std": self.cosine.std(unbiased=False).item(),
                "r_precision": self.hit.float().mean().item(), "r_precision_hard": self.hit_hard.float().mean().item()}


@dataclass
class ClipScorer:
    """A trained CLIP (:class:`labs.clip.ClipLab`) frozen as a measuring instrument: embeddings of uint8 images and
    of prompts, and the prompt-match figures of a set. ``key`` and ``info``: where it came from (the cache's key, the
    zoo entry or run folder, its zero-shot figures)."""

    lab: ClipLab
    key: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lab.eval()
        for parameter in self.lab.parameters():
            parameter.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.lab.device

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
        """(N, C, H, W) uint8 (or floats in [-1, 1], quantised to uint8 first: the pixels a PNG shows) -> (N, D)
        unit embeddings on the CPU, in batches of ``batch_size`` (every layer acts on each image alone: GroupNorm,
        no BatchNorm, so a batch's size changes only the rounding)."""
        if images.dtype != torch.uint8:
            images = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [-1, 1] -> 0..255
        out = [self.lab.embed_images(images[start:start + batch_size].to(self.device).float() / 127.5 - 1.0).float().cpu()
               for start in range(0, len(images), batch_size)]  # uint8 -> [-1, 1], as the dataset's images
        return torch.cat(out) if out else torch.zeros(0, self.lab.config.embed_dim)

    @torch.no_grad()
    def embed_texts(self, captions: Sequence[str], batch_size: int = 250) -> dict[str, torch.Tensor]:
        """Each distinct caption once: caption -> (D,) unit embedding on the CPU."""
        distinct = list(dict.fromkeys(captions))
        vectors = [self.lab.embed_texts(distinct[start:start + batch_size]).float().cpu()
                   for start in range(0, len(distinct), batch_size)]
        return dict(zip(distinct, torch.cat(vectors))) if vectors else {}

    def cosines(self, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 250) -> torch.Tensor:
        """(N,) the cosine of each image with its prompt (``genlab serve`` shows one per image)."""
        text = self.embed_texts(prompts, batch_size)
        return prompt_cosines(self.embed_images(images, batch_size), torch.stack([text[p] for p in prompts]))

    def prompt_match(self, images: torch.Tensor, prompts: Sequence[str], distractors: Distractors,
                     batch_size: int = 250, image_embeddings: torch.Tensor | None = None) -> PromptMatch:
        """The images' cosines with their own prompts and the R-precision hits against ``distractors`` (item i's
        for image i). ``image_embeddings``: the images' embeddings when already computed (then ``images`` is not
        read)."""
        if image_embeddings is None:
            image_embeddings = self.embed_images(images, batch_size)  # (N, D)
        text = self.embed_texts([*prompts, *(p for row in distractors.prompts for p in row)], batch_size)
        row_of = {caption: i for i, caption in enumerate(text)}
        table = torch.stack(list(text.values()))  # (M, D): each distinct caption once
        own = table[torch.tensor([row_of[p] for p in prompts], dtype=torch.long)]  # (N, D)
        others = table[torch.tensor([[row_of[p] for p in row] for row in distractors.prompts],
                                    dtype=torch.long).reshape(len(prompts), distractors.count)]  # (N, K, D)
        cosine = prompt_cosines(image_embeddings, own)  # (N,)
        other = torch.einsum("nd,nkd->nk", image_embeddings, others)  # (N, K)
        best = other.max(dim=1).values if distractors.count else torch.full_like(cosine, -torch.inf)  # (N,)
        return PromptMatch(cosine=cosine, hit=r_precision_hits(image_embeddings, own, others),
                           hit_hard=r_precision_hits(image_embeddings, own, others[:, :distractors.hard]),
                           margin=cosine - best)
