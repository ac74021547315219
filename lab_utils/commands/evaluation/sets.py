"""The sets of an evaluation and their metrics: which real items, generating from their prompts, the metrics of one
set against the reference, and a lab's reconstructions of the real set (the ceiling of its decoder).
Used by :mod:`lab_utils.commands.evaluation.evaluate`."""

from __future__ import annotations

import dataclasses
import inspect
import time
from typing import Any, Optional

import torch
from torch import nn

from lab_utils.core.metrics import (count_objects, fid, inception_score, kid, precision_recall, prompt_alignment,
                                    psnr)
from lab_utils.core.schema import ConfigError
from lab_utils.harness.devices import autocast_for
from lab_utils.harness.progress import progress_bar
from labs.clip.score import ClipScorer, Distractors, distractor_prompts
from labs.evaluator import Evaluator, EvaluatorOutput, dequantize, joint_log_probs, predict_from_logits, quantize

# ------------------------------------------------------------------------------------ sets
def choose_items(count: int, total: int, seed: int, held_out_mask: Optional[torch.Tensor] = None,
                 held_out_fraction: float = 0.0) -> torch.Tensor:
    """``count`` distinct indices of ``total`` items, seeded; with a mask, ``round(fraction * count)`` of them
    (as many as exist, at most) are held-out items, so held-out alignment is not measured on a handful."""
    generator = torch.Generator().manual_seed(seed)
    if count > total:
        raise ValueError(f"eval.num_samples={count} but the split has only {total} images; lower eval.num_samples")
    if held_out_mask is None or not held_out_mask.any():
        return torch.randperm(total, generator=generator)[:count]
    held = held_out_mask.nonzero().flatten()  # indices of held-out items
    seen = (~held_out_mask).nonzero().flatten()
    n_held = min(round(held_out_fraction * count), len(held))
    if count - n_held > len(seen):
        raise ValueError(f"eval.num_samples={count} needs {count - n_held} test images of seen combinations, "
                         f"the split has {len(seen)}; lower eval.num_samples")
    picked = torch.cat([held[torch.randperm(len(held), generator=generator)[:n_held]],
                        seen[torch.randperm(len(seen), generator=generator)[:count - n_held]]])
    return picked[torch.randperm(count, generator=generator)]  # mixed, so every batch has both kinds


def nfe_per_sample(lab: nn.Module, sample_options: dict[str, Any]) -> int:
    """Network evaluations per generated image: ``lab.nfe(**options)`` when the lab has it, else 1 (options a
    lab's ``nfe`` does not name are left out, unless it takes any keyword, as the families' ``nfe`` do)."""
    nfe = getattr(lab, "nfe", None)
    if not callable(nfe):
        return 1
    params = inspect.signature(nfe).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return int(nfe(**{k: v for k, v in sample_options.items() if takes_all or k in params}))


def check_sample_options(lab: nn.Module, sample_options: dict[str, Any]) -> dict[str, Any]:
    """The options that are set (None = the model's default), as given: what ``eval.json`` records and ``lab.sample``
    takes as keywords. A Lab checks them (``Lab.sample_options``, the one parser of option names): a name it does not
    take, or a value out of its field's bounds, is a ConfigError naming ``eval.sample_options``; a plain module gets
    them as they are."""
    given = {str(key): value for key, value in dict(sample_options or {}).items() if value is not None}
    check = getattr(lab, "sample_options", None)
    if check is not None:
        try:
            check(given)
        except ValueError as err:
            raise ConfigError(f"eval.sample_options: {err}") from None
    return given


@torch.no_grad()
def generate(lab: nn.Module, prompts: list[str], seed: int, batch_size: int, sample_options: dict[str, Any],
             device: torch.device, precision: str = "fp32", progress: bool = False,
             desc: str = "sample") -> tuple[torch.Tensor, float]:
    """uint8 images (N, C, H, W) for ``prompts`` (batch b seeded with ``seed + b``) and seconds per image, sampled
    under the autocast of ``precision`` (an effective one: ``lab_utils.harness.devices.sampling_precision``). ``progress``:
    a bar named ``desc`` over the images, moved on after each batch (the images and their timing are the same)."""
    images, seconds = [], 0.0
    with progress_bar(len(prompts), desc, unit="img", enabled=progress) as bar:
        for index, start in enumerate(range(0, len(prompts), batch_size)):
            batch = prompts[start:start + batch_size]
            generator = torch.Generator(device=device).manual_seed(seed + index)
            started = time.perf_counter()
            with autocast_for(precision, device):
                out = lab.sample(batch, generator=generator, **sample_options)  # (B, C, H, W) in [-1, 1]
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - started
            if out.ndim != 4 or len(out) != len(batch):
                raise ValueError(f"{type(lab).__name__}.sample returned shape {tuple(out.shape)} for {len(batch)} "
                                 "prompts")
            images.append(quantize(out).cpu())  # clamped and quantised like the real images
            bar.update(len(batch))
    return torch.cat(images), seconds / max(len(prompts), 1)


def takes_guidance(lab: Any) -> bool:
    """Whether a lab (or its class) samples with classifier-free guidance: its ``SampleOptions`` has ``guidance``."""
    options = getattr(lab, "SampleOptions", None)
    return options is not None and "guidance" in {f.name for f in dataclasses.fields(options)}


def fid_over_guidance(lab: nn.Module, prompts: list[str], seed: int, batch_size: int, sample_options: dict[str, Any],
                      device: torch.device, precision: str, scales: list[float], reference: EvaluatorOutput,
                      evaluator: Evaluator, targets: torch.Tensor, evaluated: dict[str, Any], progress: bool = False,
                      desc: str = "sample") -> dict[str, Any]:
    r"""FID of the generated set at each guidance scale $w$ of ``scales`` (the same prompts, seeds and other
    options), with its all-attributes alignment, and the $w$ of the lowest FID.

    Classifier-free guidance, $\hat\epsilon = \epsilon(x_t) + w\,(\epsilon(x_t, c) - \epsilon(x_t))$ (Ho & Salimans
    2022), trades diversity for fidelity to the prompt: they find FID lowest at a small guidance (0.1-0.3 in
    their $1 + w$ convention, 1.1-1.3 here) while the samples' fidelity to the class keeps rising with it. So FID
    is reported at the $w$ that minimises it, alignment at the model's own. ``evaluated``: the metrics at the
    evaluated options, reused for the scale they were sampled at. ``progress``: a bar per scale sampled, ``desc`` and
    the scale."""
    current = float(lab.sample_options(sample_options).guidance)  # the one w this evaluation already sampled at
    fids, alignments = [], []
    for w in scales:
        if float(w) == current:  # the generated set already evaluated: no second sampling
            metrics = evaluated
        else:
            images, _ = generate(lab, prompts, seed, batch_size, {**sample_options, "guidance": float(w)}, device,
                                 precision, progress, f"{desc} (w={float(w):g})")
            fake = evaluator.embed(images, batch_size)
            metrics = {"fid": fid(reference.features, fake.features),
                       "alignment": prompt_alignment(predict_from_logits(fake.logits), targets)}
        fids.append(float(metrics["fid"]))
        alignments.append(float(metrics["alignment"]["all"]))
    best = min(range(len(scales)), key=fids.__getitem__)
    return {"guidance": [float(w) for w in scales], "fid": fids, "alignment": alignments,
            "best_guidance": float(scales[best]), "best_fid": fids[best], "evaluated_guidance": current}


# ------------------------------------------------------------------------------------ metrics of a set
def kid_subset(subset_size: int, count: int) -> int:
    """At most half the sample count, so KID's random subsets differ and ``kid_std`` means something."""
    return max(2, min(subset_size, count // 2))


def set_metrics(reference: EvaluatorOutput, other: EvaluatorOutput, targets: torch.Tensor,
                held_out_mask: Optional[torch.Tensor], attributes: list[str], seed: int, kid_subset_size: int,
                kid_subsets: int, pr_k: int, is_splits: int) -> dict[str, Any]:
    """Every metric of ``other`` against ``reference`` (features and logits of the evaluator)."""
    size = kid_subset(kid_subset_size, min(len(reference.features), len(other.features)))
    kid_mean, kid_std = kid(reference.features, other.features, size, kid_subsets, seed)
    is_mean, is_std = inception_score(joint_log_probs(other.logits), is_splits, seed)
    pr = precision_recall(reference.features, other.features, k=pr_k)
    return {
        "fid": fid(reference.features, other.features),
        "kid_mean": kid_mean, "kid_std": kid_std,
        "inception_score": is_mean, "inception_score_std": is_std,
        "precision": pr.precision, "recall": pr.recall,
        "alignment": prompt_alignment(predict_from_logits(other.logits), targets, held_out_mask, attributes),
    }


def partial_templates(dataset: Any) -> dict[int, list[int]]:
    """The caption templates of ``dataset`` that leave attributes out ("a {colour} {shape}"), each with the indices of
    the attributes it names: an attribute is named when changing its value changes the caption."""
    base = [0] * len(dataset.attributes)
    templates = {}
    for template in range(len(dataset.templates)):
        named = [a for a, values in enumerate(dataset.attributes.values()) if len(values) > 1 and
                 dataset.describe(base[:a] + [1] + base[a + 1:], template) != dataset.describe(base, template)]
        if len(named) < len(dataset.attributes):
            templates[template] = named
    return templates


def partial_prompt_set(dataset: Any, count: int, seed: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """``count`` prompts (at most one per item) that leave attributes out: real test items (a seeded choice)
    captioned with the dataset's partial templates in turn. Returns the prompts, the items' labels (N, A) and which
    attributes each prompt names (N, A) bool; no prompts when the dataset has no partial template."""
    templates = partial_templates(dataset)
    if not templates:
        return [], torch.zeros(0, len(dataset.attributes), dtype=torch.long), torch.zeros(0, len(dataset.attributes),
                                                                                          dtype=torch.bool)
    index = choose_items(min(count, len(dataset)), len(dataset), seed)  # at most every test item once
    labels = dataset.labels[index]  # (N, A)
    chosen = [list(templates)[k % len(templates)] for k in range(len(index))]
    named = torch.zeros(labels.shape, dtype=torch.bool)
    for k, template in enumerate(chosen):
        named[k, templates[template]] = True
    return [dataset.describe(row, template) for row, template in zip(labels, chosen)], labels, named


def partial_prompt_metrics(predicted: torch.Tensor, labels: torch.Tensor, named: torch.Tensor, images: torch.Tensor,
                           attributes: list[str], templates: list[int]) -> dict[str, Any]:
    """How images drawn for prompts that leave attributes out follow what they do name: per attribute, the share
    read right among the prompts that name it; "all", the share with every named attribute right; and the share
    that shows exactly one object (such a prompt leaves several layouts open: a blend of them is two faint shapes)."""
    correct = (predicted.cpu() == labels.cpu()) | ~named  # an attribute the prompt leaves out is never wrong
    per_attribute = {name: (correct[named[:, a], a].float().mean().item() if named[:, a].any() else None)
                     for a, name in enumerate(attributes)}
    return {"templates": templates, "n": len(labels), "per_attribute": per_attribute,
            "all": correct.all(dim=1).float().mean().item(), "one_object": one_object_share(images)}


def one_object_share(images: torch.Tensor) -> float:
    """The share of ``images`` (N, C, H, W) uint8 that show exactly one object (``metrics.count_objects``): an
    image with a red circle and a faint second one reads as "a red circle" to the evaluator, not here."""
    return (count_objects(images.float() / 127.5 - 1.0) == 1).float().mean().item()


def prompt_match_metrics(scorer: ClipScorer, dataset: Any, targets: torch.Tensor, prompts: list[str],
                         real: torch.Tensor, generated: Optional[torch.Tensor], seed: int, batch_size: int,
                         distractors: int) -> dict[str, Any]:
    """The CLIP score and R-precision (``labs.clip.score``) of ``generated`` (uint8, image i drawn for ``prompts[i]``,
    the canonical caption of ``targets[i]``) and of the ``real`` images with their own captions (the ceiling), with
    the same distractors for both (``distractors`` per item, its hard negatives first; drawn with ``seed``); and the
    real images against other items' prompts (``mismatched``, a derangement: each image with the next prompt that
    differs from its own), the floor. ``generated`` None: the real figures alone (the zoo's manifest)."""
    sets = distractor_prompts(dataset, targets, distractors, seed)
    embedded = scorer.embed_images(real, batch_size)  # (N, D), read once for both
    out: dict[str, Any] = {"distractors": sets.count, "hard_negatives": sets.hard,
                           "chance": 1 / (sets.count + 1), "chance_hard": 1 / (sets.hard + 1),
                           "real_held_out": scorer.prompt_match(real, prompts, sets, batch_size, embedded).summary()}
    other = mismatched_order(prompts)
    if other is not None:
        shuffled = Distractors([sets.prompts[j] for j in other], sets.hard)
        out["mismatched"] = scorer.prompt_match(real, [prompts[j] for j in other], shuffled, batch_size,
                                                embedded).summary()
    if generated is not None:
        out["generated"] = scorer.prompt_match(generated, prompts, sets, batch_size).summary()
    return out


def mismatched_order(prompts: list[str]) -> Optional[list[int]]:
    """For each item i, the first item j after it (cyclically) whose prompt differs from its own: a pairing of every
    image with a caption not its own. None when every prompt is the same."""
    n = len(prompts)
    order = []
    for i in range(n):
        j = next(((i + k) % n for k in range(1, n) if prompts[(i + k) % n] != prompts[i]), None)
        if j is None:
            return None
        order.append(j)
    return order


def inception_metrics(reference: tuple[torch.Tensor, torch.Tensor], other: tuple[torch.Tensor, torch.Tensor],
                      seed: int, kid_subset_size: int, kid_subsets: int, is_splits: int) -> dict[str, float]:
    size = kid_subset(kid_subset_size, min(len(reference[0]), len(other[0])))
    kid_mean, kid_std = kid(reference[0], other[0], size, kid_subsets, seed)
    is_mean, is_std = inception_score(other[1], is_splits, seed)
    return {"fid": fid(reference[0], other[0]), "kid_mean": kid_mean, "kid_std": kid_std,
            "inception_score": is_mean, "inception_score_std": is_std}


def reconstruction_metrics(lab: nn.Module, test_images: torch.Tensor, prompts: list[str], reference: EvaluatorOutput,
                           evaluator: Evaluator, batch_size: int, device: torch.device, targets: torch.Tensor,
                           held_out_mask: torch.Tensor, options: dict[str, Any],
                           precision: str = "fp32") -> dict[str, Any]:
    """The real test images through ``lab.reconstruct`` (encode, decode; under the autocast of ``precision``, as
    the generated set), scored against the reference set like a generated set, with their MSE and PSNR ([-1, 1]
    images, quantised like the others)."""
    was_training = lab.training
    lab.eval()
    try:
        with torch.no_grad(), autocast_for(precision, device):
            recons = torch.cat([quantize(lab.reconstruct(dequantize(test_images[i:i + batch_size]).to(device),
                                                         prompts[i:i + batch_size])).cpu()
                                for i in range(0, len(test_images), batch_size)])
    finally:
        lab.train(was_training)
    mse = float((dequantize(recons) - dequantize(test_images)).pow(2).mean())
    metrics = set_metrics(reference, evaluator.embed(recons, batch_size), targets, held_out_mask, **options)
    return {"mse": mse, "psnr": float(psnr(mse)), **metrics}
