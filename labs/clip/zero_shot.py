"""What a joint embedding learnt, measured on real test images: zero-shot classification and retrieval.

Zero-shot classification per attribute, from prompts alone (Radford et al. 2021, sec. 3.1.2): for an image with
labels y and an attribute a with values 1..K_a, the prompts are the image's canonical caption (template 0) with
y_a replaced by each value k, $p_k = \\mathrm{describe}(y_{a \\leftarrow k})$: hard negatives that differ from the
true caption in one attribute only. The prediction is $\\hat y_a = \\arg\\max_k I_e \\cdot T_e(p_k)$. On ``shapes``
that is shape (3 prompts), colour (8), size (2) and position (9); on a one-attribute dataset (Fashion-MNIST), the
class among the 10 class captions.

Retrieval among N test items, by the canonical captions: image -> text ranks the distinct captions of the N items
for each image (a hit at k when its own caption is among the k best); text -> image ranks the N images for each
distinct caption (a hit when one of the k best images has that caption). Identical captions are one text: on
``shapes`` the 1000 test items of the default have at most 432 distinct captions, and an image of the same labels
is as right an answer as the item itself.

Works on any object with ``embed_images(images) -> (n, D)`` and ``embed_texts(captions) -> (n, D)``, unit rows
(:class:`labs.clip.ClipLab`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from lab_utils.core.lab import Measurement


def attribute_prompts(dataset: Any, labels: Sequence[int] | torch.Tensor, attribute: int) -> list[str]:
    """The canonical caption of ``labels`` with attribute number ``attribute`` set to each of its values in turn:
    K_a prompts, the k-th naming value k (``dataset.describe``, template 0)."""
    values = [int(v) for v in labels]
    names = list(dataset.attributes.values())[attribute]
    return [dataset.describe(values[:attribute] + [k] + values[attribute + 1:], 0) for k in range(len(names))]


def zero_shot_predictions(image_embeddings: torch.Tensor, prompt_embeddings: torch.Tensor) -> torch.Tensor:
    """(N, D) images and (N, K, D) prompts, one set of K per image -> (N,) the prompt of highest cosine score."""
    scores = torch.einsum("nd,nkd->nk", image_embeddings, prompt_embeddings)  # I_e . T_e(p_k): (N, K)
    return scores.argmax(dim=1)


def retrieval_recall(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, caption_of_image: torch.Tensor,
                     ks: Sequence[int] = (1, 5)) -> dict[str, dict[str, float]]:
    """Recall@k both ways between N images (N, D) and M distinct captions (M, D); ``caption_of_image`` (N,) says
    which caption is each image's. image -> text: the share of images whose caption scores among the k best of the
    M (ties counted in the image's favour); text -> image: the share of the captions that have an image of theirs
    among their k best images."""
    scores = image_embeddings @ text_embeddings.T  # (N, M) cosine similarities
    true_score = scores.gather(1, caption_of_image[:, None])  # (N, 1)
    rank = (scores > true_score).sum(dim=1)  # (N,) captions scoring strictly better than the image's own
    best_images = scores.T.topk(min(max(ks), len(scores)), dim=1).indices  # (M, k_max) best images per caption
    is_theirs = caption_of_image[best_images] == torch.arange(len(text_embeddings), device=scores.device)[:, None]
    return {
        "image_to_text": {f"recall@{k}": (rank < k).float().mean().item() for k in ks},
        "text_to_image": {f"recall@{k}": is_theirs[:, :k].any(dim=1).float().mean().item() for k in ks},
    }


def embed_in_batches(embed: Any, items: Sequence[Any] | torch.Tensor, batch_size: int) -> torch.Tensor:
    """``embed`` of ``items`` in batches of ``batch_size``, concatenated on the CPU: (len(items), D)."""
    return torch.cat([embed(items[start:start + batch_size]).float().cpu()
                      for start in range(0, len(items), batch_size)])


@torch.no_grad()
def measure_embedding(lab: Any, test_set: Any, num_items: int, seed: int, batch_size: int) -> Measurement:
    """Zero-shot accuracy per attribute (and all attributes at once), retrieval recall@1/@5 both ways, on
    ``num_items`` real items of ``test_set`` (a seeded choice); on a dataset with held-out attribute combinations,
    the zero-shot accuracy on those of the chosen items too (combinations the embedding never saw in training)."""
    if not 1 <= num_items <= len(test_set):
        raise ValueError(f"eval.num_samples={num_items}: the test split has {len(test_set)} images; "
                         f"choose 1 to {len(test_set)}")
    index = torch.randperm(len(test_set), generator=torch.Generator().manual_seed(seed))[:num_items]
    labels = test_set.labels[index]  # (N, A)
    held_out = test_set.held_out_mask[index]  # (N,)
    images = torch.stack([test_set[int(i)]["image"] for i in index])  # (N, C, S, S) in [-1, 1]
    attributes = list(test_set.attributes)

    was_training = lab.training
    lab.eval()
    try:
        image_embeddings = embed_in_batches(lab.embed_images, images, batch_size)  # (N, D)
        # every prompt is the canonical caption of some labels: embed each distinct one once
        prompts = {a: [attribute_prompts(test_set, row, a) for row in labels.tolist()] for a in range(len(attributes))}
        captions = [test_set.describe(row, 0) for row in labels.tolist()]  # (N,) the true captions
        distinct = list(dict.fromkeys([*captions, *(p for sets in prompts.values() for ps in sets for p in ps)]))
        text = dict(zip(distinct, embed_in_batches(lab.embed_texts, distinct, batch_size)))  # caption -> (D,)
    finally:
        lab.train(was_training)

    correct = torch.zeros(labels.shape, dtype=torch.bool)  # (N, A)
    for a, sets in prompts.items():
        prompt_embeddings = torch.stack([torch.stack([text[p] for p in ps]) for ps in sets])  # (N, K_a, D)
        correct[:, a] = zero_shot_predictions(image_embeddings, prompt_embeddings) == labels[:, a]
    zero_shot = {name: correct[:, a].float().mean().item() for a, name in enumerate(attributes)}
    zero_shot["all"] = correct.all(dim=1).float().mean().item()

    names = list(dict.fromkeys(captions))  # the M distinct true captions
    caption_of_image = torch.tensor([names.index(c) for c in captions])  # (N,)
    recall = retrieval_recall(image_embeddings, torch.stack([text[c] for c in names]), caption_of_image)

    figures: dict[str, Any] = {
        "num_items": num_items, "seed": seed, "zero_shot": zero_shot,
        "chance": {name: 1 / len(values) for name, values in test_set.attributes.items()},
        "retrieval": {**recall, "distinct_captions": len(names)},
    }
    if held_out.any():
        figures["zero_shot_held_out"] = {"items": int(held_out.sum()), **{
            name: correct[held_out, a].float().mean().item() for a, name in enumerate(attributes)},
            "all": correct[held_out].all(dim=1).float().mean().item()}
    shown = ", ".join(f"{name} {value:.3f}" for name, value in zero_shot.items())
    ways = " | ".join(f"{way.replace('_to_', '->')} R@1 {recall[way]['recall@1']:.3f} R@5 {recall[way]['recall@5']:.3f}"
                      for way in ("image_to_text", "text_to_image"))
    summary = f"zero-shot {shown} | retrieval among {num_items} items ({len(names)} distinct captions): {ways}"
    if held_out.any():
        summary += f" | held-out combinations ({int(held_out.sum())} items): all {figures['zero_shot_held_out']['all']:.3f}"
    return Measurement(figures=figures, summary=summary)
