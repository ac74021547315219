"""The CLIP lab: a joint text-image embedding trained from scratch with the symmetric contrastive loss
(Radford et al. 2021), ``model=clip``. Not a generative model.

    model.py      ImageEncoder (a small residual CNN for 32 px images), contrastive_loss (fig. 3's symmetric
                  InfoNCE, optionally with several positives per row), ClipConfig, ClipModel (encoders, projections,
                  the learned temperature t), ClipLab (trained by the harness)
    zero_shot.py  what it learnt, on real test images: zero-shot classification per attribute from prompts that
                  differ in one attribute, retrieval recall@1/@5 both ways (measure_embedding)
    score.py      what a trained one reads of other images: the CLIP score and R-precision of images against their
                  prompts (ClipScorer), for every family in ``genlab eval``, ``compare`` and ``serve``. Not imported
                  here: ``from labs.clip.score import ClipScorer`` (so the scoring code is no part of a trained
                  model's key, and a change to it retrains nothing)

    genlab train model=clip data=shapes preset=cpu
    genlab eval run=<that run>          # prints and writes the zero-shot and retrieval figures (eval.json)

It uses the shared text encoder (``labs.text_encoder``) and imports no other lab.
"""

from .model import (
    ClipConfig, ClipLab, ClipModel, ClipOutput, ContrastiveLoss, ImageEncoder, ResBlock, contrastive_loss,
    same_caption,
)
from .zero_shot import (
    attribute_prompts, embed_in_batches, measure_embedding, retrieval_recall, zero_shot_predictions,
)

__all__ = [
    "ClipConfig", "ClipLab", "ClipModel", "ClipOutput", "ContrastiveLoss", "ImageEncoder", "ResBlock",
    "attribute_prompts", "contrastive_loss", "embed_in_batches", "measure_embedding", "retrieval_recall",
    "same_caption", "zero_shot_predictions",
]
