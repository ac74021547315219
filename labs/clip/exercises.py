r"""Checks for the joint-embedding exercises (notebook 07).

Every reference is the lab's own code, so an exercise checks the student against exactly what training and
``genlab eval`` use (and that code raises while the student's runs, so an answer cannot just call it):

- :func:`check_clip_loss`: the symmetric contrastive loss of Radford et al. 2021 (fig. 3),
  $\tfrac12 \big(\mathrm{CE}(\ell, y) + \mathrm{CE}(\ell^\top, y)\big)$ with $\ell = e^t\, I_e T_e^\top$ and
  $y = (0, \dots, n-1)$, against :func:`labs.clip.contrastive_loss`;
- :func:`check_zero_shot_predict`: zero-shot classification, $\hat y_i = \arg\max_k I_e^{(i)} \cdot T_e^{(k)}$ with one
  prompt per class, against :func:`labs.clip.zero_shot_predictions`;
- :func:`check_recall_at_k`: retrieval recall@k both ways from an images x captions similarity matrix whose i-th
  caption is the i-th image's, against :func:`labs.clip.retrieval_recall`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from lab_utils.core.exercises.cases import Case, Hint
from lab_utils.core.exercises.checks import CheckResult, check_function
from lab_utils.core.exercises.records import case_seed, graded

from .model import ClipLab, contrastive_loss
from .zero_shot import retrieval_recall, zero_shot_predictions


def _unit(gen: torch.Generator, n: int, dim: int) -> torch.Tensor:
    """(n, dim) random unit rows, as the encoders' L2-normalised embeddings."""
    return F.normalize(torch.randn(n, dim, generator=gen), dim=-1)


def _near(gen: torch.Generator, rows: torch.Tensor, noise: float) -> torch.Tensor:
    """Unit rows close to ``rows``: a trained embedding, where each caption lies near its image."""
    return F.normalize(rows + noise * torch.randn(rows.shape, generator=gen), dim=-1)


# ---------------------------------------------------------------------------------- the contrastive loss
@graded("clip_loss")
def check_clip_loss(clip_loss: Callable) -> CheckResult:
    r"""``clip_loss(image_embeddings, text_embeddings, logit_scale) -> loss``: the symmetric contrastive loss of a batch
    of n (image, caption) pairs, a 0-dim tensor. The embeddings are (n, D) unit rows, row i of each being pair i;
    ``logit_scale`` is $e^t$ (a 0-dim tensor, already exponentiated). With $\ell = e^t I_e T_e^\top$ (n, n) and the
    targets $y = (0, 1, \dots, n - 1)$: $\tfrac12 (\mathrm{CE}(\ell, y) + \mathrm{CE}(\ell^\top, y))$, each CE a mean
    over the batch. The lab's ``contrastive_loss`` and ``ClipLab.loss`` may not be called."""
    gen = torch.Generator().manual_seed(case_seed(0))
    images = _unit(gen, 8, 16)
    matched = _unit(gen, 6, 16)
    cases = [Case((images, _unit(gen, 8, 16), torch.tensor(1 / 0.07)), label="random pairs, n = 8, exp(t) = 1/0.07"),
             Case((matched, _near(gen, matched, 0.3), torch.tensor(30.0)), label="captions near their images, n = 6"),
             Case((images[:5], _near(gen, images[:5], 1.0), torch.tensor(1.0)), label="t = 0 (exp(t) = 1), n = 5"),
             Case((matched[:3], _near(gen, matched[:3], 0.1), torch.tensor(100.0)), label="the largest scale, 100")]

    def reference(image_embeddings, text_embeddings, logit_scale):
        return contrastive_loss(image_embeddings, text_embeddings, logit_scale).loss

    def targets(logits):
        return torch.arange(len(logits))

    def images_only(image_embeddings, text_embeddings, logit_scale):
        logits = logit_scale * image_embeddings @ text_embeddings.T
        return F.cross_entropy(logits, targets(logits))

    def texts_only(image_embeddings, text_embeddings, logit_scale):
        logits = logit_scale * image_embeddings @ text_embeddings.T
        return F.cross_entropy(logits.T, targets(logits))

    def summed(image_embeddings, text_embeddings, logit_scale):
        logits = logit_scale * image_embeddings @ text_embeddings.T
        return F.cross_entropy(logits, targets(logits)) + F.cross_entropy(logits.T, targets(logits))

    def unscaled(image_embeddings, text_embeddings, logit_scale):
        return reference(image_embeddings, text_embeddings, torch.tensor(1.0))

    def divided(image_embeddings, text_embeddings, logit_scale):
        return reference(image_embeddings, text_embeddings, 1 / logit_scale)

    def exponentiated(image_embeddings, text_embeddings, logit_scale):
        return reference(image_embeddings, text_embeddings, logit_scale.exp())

    def summed_over_batch(image_embeddings, text_embeddings, logit_scale):
        return reference(image_embeddings, text_embeddings, logit_scale) * len(image_embeddings)

    return check_function(
        clip_loss, reference, cases, name="clip_loss", atol=1e-4,
        hint=Hint("score every image against every caption of the batch (cosines, scaled by exp(t)); the right caption "
                  "of image i is caption i, so each row is a classification over the n captions, and each column one "
                  "over the n images: average the two cross-entropies",
                  "logits = logit_scale * image_embeddings @ text_embeddings.T is (n, n); the targets are "
                  "0, 1, ..., n - 1; F.cross_entropy on the logits (each image picks its caption) and on their "
                  "transpose (each caption picks its image), then the mean of the two"),
        forbid=(reference, contrastive_loss, (ClipLab, "loss")),
        known_mistakes=[(images_only, "the loss is symmetric: add the captions' cross-entropy over the columns "
                                      "(the transposed logits), and take the mean of the two directions"),
                        (texts_only, "the loss is symmetric: add the images' cross-entropy over the rows "
                                     "(the logits themselves), and take the mean of the two directions"),
                        (summed, "take the mean of the two directions, (CE(l, y) + CE(l^T, y)) / 2, not their sum"),
                        (unscaled, "multiply the cosines by the logit scale exp(t) before the softmax: without it "
                                   "every logit lies in [-1, 1] and no probability can get near 1"),
                        (divided, "the logits are the cosines *times* exp(t) (exp(t) is the inverse temperature, "
                                  "1 / 0.07 at the start), not divided by it"),
                        (exponentiated, "logit_scale is exp(t) already: multiply by it as it is, do not take its "
                                        "exponential again"),
                        (summed_over_batch, "each cross-entropy is a mean over the batch (F.cross_entropy's "
                                            "default), not a sum")])


# ---------------------------------------------------------------------------------- zero-shot prediction
@graded("zero_shot_predict")
def check_zero_shot_predict(zero_shot_predict: Callable) -> CheckResult:
    r"""``zero_shot_predict(image_embeddings, class_embeddings) -> predictions``: (N, D) unit image embeddings and
    (K, D) unit text embeddings, one prompt per class, give the (N,) integer index of each image's class: the prompt of
    the highest cosine, $\hat y_i = \arg\max_k I_e^{(i)} \cdot T_e^{(k)}$. The lab's ``zero_shot_predictions`` (the
    same with a set of prompts per image) may not be called."""
    gen = torch.Generator().manual_seed(case_seed(1))
    classes = _unit(gen, 5, 16)
    labels = torch.randint(0, 5, (12,), generator=gen)
    cases = [Case((_near(gen, classes[labels], 0.8), classes), label="12 images, 5 classes"),
             Case((_unit(gen, 7, 16), _unit(gen, 3, 16)), label="7 random images, 3 classes"),
             Case((_unit(gen, 4, 8), _unit(gen, 9, 8)), label="4 images, 9 classes (more classes than images)"),
             Case((_unit(gen, 1, 8), _unit(gen, 2, 8)), label="one image, 2 classes")]

    def reference(image_embeddings, class_embeddings):
        n, (k, d) = len(image_embeddings), class_embeddings.shape
        return zero_shot_predictions(image_embeddings, class_embeddings.expand(n, k, d))  # the same K for each image

    def lowest(image_embeddings, class_embeddings):
        return (image_embeddings @ class_embeddings.T).argmin(dim=1)

    def per_class(image_embeddings, class_embeddings):
        return (image_embeddings @ class_embeddings.T).argmax(dim=0)

    return check_function(
        zero_shot_predict, reference, cases, name="zero_shot_predict",
        hint=Hint("each class is its prompt's point in the joint space: an image belongs to the class whose prompt "
                  "lies closest to it, the highest cosine; the embeddings are unit vectors, so a cosine is a dot "
                  "product",
                  "image_embeddings @ class_embeddings.T is (N, K): row i holds image i's cosine with every class's "
                  "prompt; the prediction is the index of each row's largest entry (argmax over dim 1), an integer "
                  "tensor of shape (N,)"),
        forbid=(reference, zero_shot_predictions),
        known_mistakes=[(lowest, "the best class has the *highest* cosine (argmax), the prompt at the smallest "
                                 "distance, not the lowest cosine"),
                        (per_class, "take the argmax over the classes (dim 1 of the (N, K) cosines): one prediction "
                                    "per image, not the best image of each class")])


# ---------------------------------------------------------------------------------- retrieval recall@k
def _recall_pair(fn: Callable) -> Callable:
    """``fn``'s two recalls as one float64 tensor (image -> text, text -> image), whatever numbers it returned."""
    return lambda similarity, k: torch.tensor([float(value) for value in fn(similarity, k)], dtype=torch.float64)


@graded("recall_at_k")
def check_recall_at_k(recall_at_k: Callable) -> CheckResult:
    r"""``recall_at_k(similarity, k) -> (image_to_text, text_to_image)``: two floats from an (N, N) similarity matrix
    of N images (rows) and N captions (columns), caption i being image i's. image -> text: the share of images whose
    own caption is among the k highest of its row; text -> image: the share of captions whose own image is among the
    k highest of its column. The lab's ``retrieval_recall`` (the same on embeddings) may not be called."""
    gen = torch.Generator().manual_seed(case_seed(2))
    noisy = torch.eye(10, dtype=torch.float64) + 0.7 * torch.randn(10, 10, generator=gen, dtype=torch.float64)
    hub = torch.randn(8, 8, generator=gen, dtype=torch.float64) + 2.0 * torch.eye(8, dtype=torch.float64)
    hub[:, 3] += 3.0  # caption 3 is a "hub": every image ranks it high (image -> text suffers, text -> image not)
    cases = [Case((noisy, 1), label="10 pairs, k = 1"),
             Case((noisy, 3), label="10 pairs, k = 3"),
             Case((hub, 2), label="8 pairs, a caption that every image ranks high, k = 2"),
             Case((torch.randn(6, 6, generator=gen, dtype=torch.float64), 6), label="k = N: every item found"),
             Case((torch.randn(12, 12, generator=gen, dtype=torch.float64), 5), label="12 random pairs, k = 5")]

    def lab_recall(similarity, k):
        recall = retrieval_recall(similarity, torch.eye(len(similarity.T), dtype=similarity.dtype),
                                  torch.arange(len(similarity)), ks=(k,))  # S I = S: the scores are the matrix
        return recall["image_to_text"][f"recall@{k}"], recall["text_to_image"][f"recall@{k}"]

    def rank_of_own(scores):  # (N, N) rows: how many entries of each row score above the diagonal's
        return (scores > scores.diagonal()[:, None]).sum(dim=1)

    def right(similarity, k):
        return (rank_of_own(similarity) < k).double().mean(), (rank_of_own(similarity.T) < k).double().mean()

    def swapped(similarity, k):
        return tuple(reversed(right(similarity, k)))

    def rows_twice(similarity, k):
        image_to_text = right(similarity, k)[0]
        return image_to_text, image_to_text

    def within_k_plus_one(similarity, k):
        return right(similarity, k + 1)

    def exactly_kth(similarity, k):
        return ((rank_of_own(similarity) == k - 1).double().mean(),
                (rank_of_own(similarity.T) == k - 1).double().mean())

    return check_function(
        _recall_pair(recall_at_k), _recall_pair(lab_recall), cases, name="recall_at_k", atol=1e-6,
        hint=Hint("image -> text ranks the captions for each image (a row of the matrix), text -> image ranks the "
                  "images for each caption (a column); a query is found when its own partner, on the diagonal, is "
                  "among the k best of its line; recall@k is the share of queries found",
                  "for each row, count the entries that score strictly higher than the row's diagonal entry: the "
                  "image is found when fewer than k do; the same on the transposed matrix for the captions; return "
                  "the two shares (means over the N queries) as floats, image -> text first"),
        forbid=(lab_recall, retrieval_recall), fallback=lab_recall,
        known_mistakes=[(_recall_pair(mistake), message) for mistake, message in (
            (swapped, "the two recalls are swapped: image -> text (each image's row) comes first"),
            (rows_twice, "text -> image ranks the images for each caption: the matrix's *columns* (its transpose's "
                         "rows), not its rows again"),
            (within_k_plus_one, "a query is found when its partner is among the k best: fewer than k others score "
                                "above it, not k or fewer"),
            (exactly_kth, "recall@k counts a query when its partner is *anywhere* in the top k, not only when it is "
                          "k-th"))])
