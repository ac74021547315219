"""Evaluate a trained lab: generate from real test prompts, embed, and compare with real images.

    reference set      ``num_samples`` real TRAIN images (seeded choice)
    real held-out set  ``num_samples`` real TEST images (seeded; on ``shapes`` a fixed share of them
                       has an attribute combination held out of training)
    generated set      one image per real held-out item, from its canonical caption
                       (``dataset.describe(labels, template=0)``), so the prompts' labels are the targets

Every metric of the generated set against the reference is reported beside the same metric of
the real held-out set against the reference, at the same sample count: the *floor* of FID/KID
and the *ceiling* of IS, precision, recall and alignment. A number without its floor means
little (FID of real-vs-real at 1000 samples is far from 0). ``one_object`` is the share of images that show
exactly one object (``metrics.count_objects``; the real ceiling is 1.0 on shapes and Fashion-MNIST): alignment
reads which shape an image shows, and an image with a second, fainter circle still reads as "a red circle".
The **CLIP score** and **R-precision** (``labs.clip.score``) read how well each image matches its prompt through a
joint embedding of the dataset trained from scratch (the CLIP scorer, ``clip_scorer.py``: shipped for ``shapes``,
trained once and cached elsewhere), so they need no attribute labels: the same prompts, images and distractors for
every family, beside the real images with their own captions (the ceiling) and with other items' (the floor).

``genlab eval run=<dir>`` is :func:`eval_command_main`; it writes ``<run>/eval.json``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lab_utils.commands.evaluation.cache import evaluator_from_run, get_evaluator
from lab_utils.commands.evaluation.clip_scorer import clip_scorer_from_run, get_clip_scorer, scorer_description
from lab_utils.core.schema import ConfigError
from lab_utils.core.plotting import write_file
from lab_utils.core.schema import typed_section
from lab_utils.harness.checkpoint import first_line
from lab_utils.harness.progress import progress_bar
from labs.clip.score import ClipScorer
from labs.evaluator import Evaluator, predict_from_logits, quantize, real_images
from lab_utils.commands.evaluation.sets import (  # noqa: F401 (generate, nfe_per_sample: imported from here by compare, bench)
    check_sample_options, choose_items, fid_over_guidance, generate, inception_metrics, nfe_per_sample,
    one_object_share, partial_prompt_metrics, partial_prompt_set, partial_templates, prompt_match_metrics,
    reconstruction_metrics, set_metrics, takes_guidance,
)

log = logging.getLogger("genlab.eval")


# ------------------------------------------------------------------------------------ config
@dataclass
class EvalConfig:
    """Schema of the ``eval:`` section of ``conf/eval.yaml`` (values and why are commented there)."""

    num_samples: int = 1000  # images per set (reference, real held-out, generated)
    batch_size: int = 250  # generation and embedding batch
    seed: int = 0  # picks the real images and seeds generation (batch b uses seed + b)
    features: str = "evaluator"  # evaluator | inception (adds the standard Inception FID/KID/IS)
    inception_weights: Optional[str] = None  # torch-fidelity's pt_inception-2015-12-05 state dict
    kid_subset_size: int = 500  # at most num_samples / 2, so the subsets differ
    kid_subsets: int = 100
    pr_k: int = 3  # k of the k-NN manifolds of precision/recall (Kynkaanniemi et al. use 3)
    is_splits: int = 10  # Inception Score splits (Salimans et al. use 10)
    held_out_fraction: float = 0.1  # share of the real held-out set drawn from held-out combinations
    device: str = "auto"
    ema: bool = True  # sample with the run's EMA weights
    sample_options: dict[str, Any] = field(default_factory=dict)  # passed to lab.sample; None values are left out
    # autocast of the sampling: null = the run's trainer.precision on CUDA, fp32 elsewhere (devices.sampling_precision)
    precision: Optional[str] = None
    # FID of the generated set again at each of these guidance scales (diffusion): the sweep and its minimum go
    # into eval.json beside the metrics at the evaluated guidance (null: off)
    fid_guidance: Optional[list[float]] = None
    evaluator_preset: str = "cpu"  # training budget of the evaluator when it is not cached yet
    evaluator_overrides: list[str] = field(default_factory=list)  # e.g. ["model.width=64"]
    evaluator_run: Optional[str] = None  # use this evaluator run directory instead of the cache
    train_evaluator: bool = True  # train the evaluator (and the CLIP scorer) when not shipped or cached (else: error)
    cache_dir: Optional[str] = None  # null: $GENLAB_CACHE/evaluators and $GENLAB_CACHE/clip; else there and <it>/clip
    progress: bool = True  # progress bars on stderr (sampling, features; lab_utils.harness.progress), widgets in Jupyter
    # images drawn for prompts that leave attributes out (the dataset's partial caption templates, "a red circle"):
    # named attributes right, and one object per image; 0 = not measured
    partial_samples: int = 200
    # the CLIP score and R-precision of every set (labs.clip.score), read by the dataset's CLIP scorer: the zoo's
    # (shapes), or trained once with clip_preset (null: evaluator_preset's) and cached beside the evaluators
    clip_score: bool = True
    clip_preset: Optional[str] = None
    clip_run: Optional[str] = None  # use this `genlab train model=clip` run as the scorer instead
    # R-precision: distractor prompts per image, its hard negatives (its caption with one attribute changed) first,
    # then random other captions (AttnGAN: 99 random others, chance 1/100); fewer where the dataset has fewer
    r_precision_distractors: int = 99

    def __post_init__(self) -> None:
        if self.r_precision_distractors < 1:
            raise ValueError(f"eval.r_precision_distractors must be >= 1, got {self.r_precision_distractors}")
        if self.clip_preset is not None and self.clip_preset not in ("smoke", "cpu", "gpu"):
            raise ValueError(f"eval.clip_preset must be null (eval.evaluator_preset's), smoke, cpu or gpu, got "
                             f"{self.clip_preset!r}")
        if self.partial_samples < 0:
            raise ValueError(f"eval.partial_samples must be >= 0 (0: not measured), got {self.partial_samples}")
        for name in ("num_samples", "batch_size", "kid_subset_size", "kid_subsets", "pr_k", "is_splits"):
            if getattr(self, name) <= 0:
                raise ValueError(f"eval.{name} must be positive, got {getattr(self, name)}")
        if self.num_samples <= self.pr_k:
            raise ValueError(f"eval.num_samples={self.num_samples} must exceed eval.pr_k={self.pr_k}")
        if self.features not in ("evaluator", "inception"):
            raise ValueError(f"eval.features must be 'evaluator' or 'inception', got {self.features!r}")
        if self.features == "inception" and not self.inception_weights:
            raise ValueError("eval.features=inception needs eval.inception_weights=<path to the Inception-v3 "
                             "weights file> (torch-fidelity's weights-inception-2015-12-05-6726825d.pth)")
        if not 0 <= self.held_out_fraction <= 1:
            raise ValueError(f"eval.held_out_fraction must be in [0, 1], got {self.held_out_fraction}")
        if self.precision not in (None, "fp32", "bf16", "fp16"):
            raise ValueError(f"eval.precision must be null (the run's on CUDA, fp32 elsewhere), fp32, bf16 or fp16, "
                             f"got {self.precision!r}")
        check_guidance_sweep(self.fid_guidance, "eval.fid_guidance")


def check_guidance_sweep(scales: Optional[list[float]], name: str) -> None:
    """A guidance sweep is null or a non-empty list of scales >= 0."""
    if scales is not None and (not scales or any(w < 0 for w in scales)):
        raise ValueError(f"{name} must be null (off) or a non-empty list of guidance scales >= 0, e.g. "
                         f"[1.0, 1.5, 2.0, 3.0]; got {list(scales)}")


# ------------------------------------------------------------------------------------ Inception
class InceptionFeatures(nn.Module):
    """The standard Inception-v3 of FID/IS, as torchmetrics builds it, from a local weights file.

    ``features``: the 2048-d pool features of FID/KID; ``logits``: the 1008 "logits_unbiased"
    (pool features times the fc weight, no bias) of torchmetrics' Inception Score. Images are
    uint8, grey ones repeated to 3 channels; the network resizes them to 299 px itself.
    """

    def __init__(self, weights_path: str | Path):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"eval.inception_weights={weights_path}: no such file (it should be torch-fidelity's "
                "weights-inception-2015-12-05-6726825d.pth, a state dict of FeatureExtractorInceptionV3)")
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # cheap: keys only
            except RuntimeError:  # files in the legacy (pre-zip) format cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"eval.inception_weights={path} is not a readable PyTorch weights file "
                             f"({type(err).__name__}: {first_line(err)})") from None
        if not isinstance(state, dict) or "fc.weight" not in state or "Mixed_7c.branch_pool.conv.weight" not in state:
            raise ValueError(f"eval.inception_weights={path} is not an Inception-v3 state dict in torch-fidelity's "
                             "format (keys such as 'Mixed_7c.branch_pool.conv.weight', 'fc.weight')")
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=str(path))
        self.path = str(path)

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (N, C, H, W) -> 2048-d features (N, 2048) and logits_unbiased (N, 1008), on the CPU."""
        device = self.net.fc.weight.device
        features = []
        for start in range(0, len(images), batch_size):
            x = quantize(images[start:start + batch_size]).to(device)  # (B, C, H, W) uint8
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)  # grey -> RGB, (B, 3, H, W)
            features.append(self.net(x).cpu())  # (B, 2048)
        features = torch.cat(features)
        logits = features @ self.net.fc.weight.cpu().T  # logits_unbiased: no bias, as torchmetrics' IS
        return features, logits


# ------------------------------------------------------------------------------------ result
@dataclass
class EvalResult:
    model: str
    data: str
    step: Optional[int]
    num_samples: int
    seed: int
    sample_options: dict[str, Any]
    nfe_per_sample: int  # network evaluations per image (1 for GAN/VAE, steps (x2 with guidance) for diffusion)
    sampling_seconds_per_image: float
    evaluator: dict[str, Any]  # key, test accuracy, number of features and IS classes
    generated: dict[str, Any]  # generated vs reference
    real_held_out: dict[str, Any]  # real held-out vs reference: the floor (FID/KID) / ceiling (the rest)
    held_out_prompts: int  # prompts whose attribute combination was held out of training
    sample_precision: str = "fp32"  # the autocast the images were sampled under
    # FID at each scale of eval.fid_guidance, and the scale that minimises it (None: no sweep)
    fid_guidance: Optional[dict[str, Any]] = None
    inception: Optional[dict[str, Any]] = None  # the same with the standard Inception-v3, when asked for
    # a lab that can reconstruct (VAE, ldm): the held-out real images encoded and decoded, scored like a generated
    # set, plus their PSNR: the ceiling of what its decoder can draw
    reconstruction: Optional[dict[str, Any]] = None
    # prompts that leave attributes out ("a red circle"): named attributes right, one object (None: not measured)
    partial_prompts: Optional[dict[str, Any]] = None
    # the CLIP scorer and the R-precision settings (distractors, hard negatives, chance), and the real images against
    # other items' prompts (mismatched: the floor); the sets' clip_score and r_precision are in generated and
    # real_held_out (None: not measured)
    clip: Optional[dict[str, Any]] = None
    eval_seconds: float = 0.0
    run_dir: Optional[str] = None
    checkpoint: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line: each metric of the generated set with the real set's value in brackets."""
        return summary_line(self.to_dict())


def summary_line(result: dict[str, Any]) -> str:
    gen, real = result["generated"], result["real_held_out"]

    def pair(key: str, fmt: str) -> str:
        return f"{format(gen[key], fmt)} (real {format(real[key], fmt)})"

    align = f"align {gen['alignment']['all']:.1%} (real {real['alignment']['all']:.1%})"
    if gen["alignment"].get("held_out"):
        align += (f", held-out {gen['alignment']['held_out']['all']:.1%} "
                  f"(real {real['alignment']['held_out']['all']:.1%})")
    head = f"{result['model']} step {result['step']} on {result['data']} (n={result['num_samples']}):"
    parts = [f"FID {pair('fid', '.2f')}", f"KID {pair('kid_mean', '.4f')}", f"IS {pair('inception_score', '.2f')}",
             f"P {pair('precision', '.3f')}", f"R {pair('recall', '.3f')}", align]
    if gen.get("one_object") is not None:
        parts.append(f"one object {gen['one_object']:.1%} (real {real['one_object']:.1%})")
    if gen.get("clip_score") is not None:
        clip = result.get("clip") or {}
        floor = (clip.get("mismatched") or {}).get("clip_score")
        real_floor = f", mismatched {floor:.3f}" if floor is not None else ""
        parts.append(f"CLIP score {gen['clip_score']:.3f} (real {real['clip_score']:.3f}{real_floor}), R-precision "
                     f"{pair('r_precision', '.3f')} among {clip.get('distractors', '?')} + 1, hard negatives "
                     f"{pair('r_precision_hard', '.3f')}")
    if result.get("partial_prompts"):
        part = result["partial_prompts"]
        parts.append(f"partial prompts: named attributes {part['all']:.1%}, one object {part['one_object']:.1%}")
    if result.get("inception"):
        inc = result["inception"]
        parts.append(f"Inception FID {inc['generated']['fid']:.2f} (real {inc['real_held_out']['fid']:.2f})")
    if result.get("fid_guidance"):
        sweep = result["fid_guidance"]
        points = ", ".join(f"w={w:g} {value:.2f}" for w, value in zip(sweep["guidance"], sweep["fid"]))
        parts.append(f"FID over guidance {points} (lowest at w={sweep['best_guidance']:g})")
    parts.append(f"NFE {result['nfe_per_sample']}, {1000 * result['sampling_seconds_per_image']:.1f} ms/image")
    if result.get("reconstruction"):
        rec = result["reconstruction"]
        parts.append(f"reconstructions: PSNR {rec['psnr']:.1f} dB, FID {rec['fid']:.2f}, align {rec['alignment']['all']:.1%}")
    return head + " " + " | ".join(parts)


# ------------------------------------------------------------------------------------ the evaluation
def evaluate_lab(
    lab: nn.Module,
    data_cfg: Any,
    evaluator: Evaluator,
    num_samples: int = 1000,
    seed: int = 0,
    batch_size: int = 250,
    sample_options: Optional[dict[str, Any]] = None,
    device: str | torch.device = "cpu",
    *,
    kid_subset_size: int = 500,
    kid_subsets: int = 100,
    pr_k: int = 3,
    is_splits: int = 10,
    held_out_fraction: float = 0.1,
    inception: Optional[InceptionFeatures] = None,
    model_name: Optional[str] = None,
    step: Optional[int] = None,
    precision: str = "fp32",
    fid_guidance: Optional[list[float]] = None,
    progress: bool = True,
    partial_samples: int = 0,
    clip: Optional[ClipScorer] = None,
    r_precision_distractors: int = 99,
) -> EvalResult:
    """Generate ``num_samples`` images from real test prompts and compare them, and real test images,
    with ``num_samples`` real training images (see the module docstring). The lab samples (and
    reconstructs) under the autocast of ``precision``, an effective precision (``devices.sampling_precision``).
    ``fid_guidance``: FID again at each of these guidance scales (a lab whose sampling takes ``guidance``).
    ``progress``: a bar while the images are sampled and one while the sets are embedded and scored
    (``lab_utils.harness.progress``: a widget in Jupyter, a bar in a terminal, a line now and then in a log).
    ``partial_samples``: images for prompts that leave attributes out (:func:`partial_prompt_metrics`; 0: none; at
    most ``num_samples``). ``genlab eval`` and ``genlab compare`` draw ``eval.partial_samples`` (200).
    ``clip``: a CLIP scorer: the CLIP score and R-precision (``r_precision_distractors`` per image) of the generated
    and the real set (:func:`prompt_match_metrics`; distractors drawn with ``seed + 3``); None: not measured."""
    from lab_utils.core.data import build_dataset

    started = time.perf_counter()
    device = torch.device(device)
    sample_options = check_sample_options(lab, sample_options)  # None = the model's default: left out
    if fid_guidance and not takes_guidance(lab):
        raise ConfigError(f"eval.fid_guidance={list(fid_guidance)}: {type(lab).__name__}.sample takes no guidance "
                          "(only the diffusion families do); leave eval.fid_guidance null")
    train_set, test_set = build_dataset(data_cfg, "train"), build_dataset(data_cfg, "test")
    attributes = list(train_set.attributes)
    if list(evaluator.attributes) != attributes:
        raise ValueError(f"the evaluator classifies {list(evaluator.attributes)}, the dataset has {attributes}")
    name = model_name or getattr(getattr(lab, "config", None), "name", None) or type(lab).__name__  # a Lab's config

    # (1) the real sets, quantised exactly like generated images
    reference_idx = choose_items(num_samples, len(train_set), seed)
    test_idx = choose_items(num_samples, len(test_set), seed + 1, test_set.held_out_mask, held_out_fraction)
    reference_images = real_images(train_set, reference_idx)  # (n, C, S, S) uint8
    test_images = real_images(test_set, test_idx)
    targets = test_set.labels[test_idx]  # (n, A): what each prompt asks for
    held_out_mask = test_set.held_out_mask[test_idx]  # (n,)
    prompts = [test_set.describe(labels, template=0) for labels in targets]

    # (2) the generated set: one image per real test item, from its canonical caption
    was_training = lab.training
    lab.eval()
    try:
        generated_images, seconds_per_image = generate(lab, prompts, seed, batch_size, sample_options, device,
                                                       precision, progress, f"eval {name}: sample")
    finally:
        lab.train(was_training)
    if generated_images.shape[1:] != test_images.shape[1:]:
        raise ValueError(f"the lab generates {tuple(generated_images.shape[1:])} images, the dataset has "
                         f"{tuple(test_images.shape[1:])}")

    # (3) embed every set once; every metric reads these features and logits
    with progress_bar(3, f"eval {name}: features and metrics", unit="set", enabled=progress) as bar:
        reference = evaluator.embed(reference_images, batch_size)
        bar.update()
        real = evaluator.embed(test_images, batch_size)
        bar.update()
        fake = evaluator.embed(generated_images, batch_size)
        options = dict(attributes=attributes, seed=seed, kid_subset_size=kid_subset_size, kid_subsets=kid_subsets,
                       pr_k=pr_k, is_splits=is_splits)
        generated_metrics = set_metrics(reference, fake, targets, held_out_mask, **options)
        real_metrics = set_metrics(reference, real, targets, held_out_mask, **options)
        generated_metrics["one_object"] = one_object_share(generated_images)  # alignment does not count objects
        real_metrics["one_object"] = one_object_share(test_images)
        prompt_match = None
        if clip is not None:  # the same prompts and distractors for both sets
            prompt_match = prompt_match_metrics(clip, test_set, targets, prompts, test_images, generated_images,
                                                seed + 3, batch_size, r_precision_distractors)
            generated_metrics.update(prompt_match.pop("generated"))
            real_metrics.update(prompt_match.pop("real_held_out"))
            prompt_match = {"scorer": scorer_description(clip), **prompt_match}
        bar.update()
    sweep = None
    if fid_guidance:
        sweep = fid_over_guidance(lab, prompts, seed, batch_size, sample_options, device, precision, fid_guidance,
                                  reference, evaluator, targets, generated_metrics, progress, f"eval {name}: sample")

    partial = None
    partial_prompts, partial_labels, named = partial_prompt_set(test_set, min(partial_samples, num_samples), seed + 2)
    if partial_prompts:  # seeds of their own (seed + 2): the generated set above is drawn as before
        lab.eval()
        try:
            partial_images, _ = generate(lab, partial_prompts, seed + 2, batch_size, sample_options, device,
                                         precision, progress, f"eval {name}: partial prompts")
        finally:
            lab.train(was_training)
        predicted = predict_from_logits(evaluator.embed(partial_images, batch_size).logits)
        partial = partial_prompt_metrics(predicted, partial_labels, named, partial_images, attributes,
                                         sorted(partial_templates(test_set)))

    reconstruction = None
    if callable(getattr(lab, "reconstruct", None)):
        reconstruction = reconstruction_metrics(lab, test_images, prompts, reference, evaluator, batch_size, device,
                                                targets, held_out_mask, options, precision)

    inception_result = None
    if inception is not None:
        with progress_bar(3, f"eval {name}: Inception features", unit="set", enabled=progress) as bar:
            embedded = []
            for images in (reference_images, generated_images, test_images):
                embedded.append(inception.embed(images))
                bar.update()
        inc_reference, inc_generated, inc_real = embedded
        inception_result = {
            "weights": inception.path,
            "generated": inception_metrics(inc_reference, inc_generated, seed, kid_subset_size, kid_subsets,
                                           is_splits),
            "real_held_out": inception_metrics(inc_reference, inc_real, seed, kid_subset_size, kid_subsets,
                                               is_splits),
        }

    return EvalResult(
        model=str(name), data=str(train_set.name), step=step, num_samples=num_samples, seed=seed,
        sample_options=sample_options, nfe_per_sample=nfe_per_sample(lab, sample_options),
        sampling_seconds_per_image=seconds_per_image,
        evaluator={"key": evaluator.key, "test_accuracy": evaluator.test_accuracy,
                   "num_features": evaluator.num_features, "is_classes": evaluator.num_classes,
                   "path": evaluator.info.get("path")},
        generated=generated_metrics, real_held_out=real_metrics, held_out_prompts=int(held_out_mask.sum()),
        sample_precision=precision, fid_guidance=sweep, partial_prompts=partial, clip=prompt_match,
        inception=inception_result, reconstruction=reconstruction, eval_seconds=time.perf_counter() - started,
    )


def real_prompt_match(scorer: ClipScorer, data_cfg: Any, num_samples: int, seed: int = 0, batch_size: int = 250,
                      held_out_fraction: float = 0.1, distractors: int = 99) -> dict[str, Any]:
    """The CLIP score and R-precision of the real test images :func:`evaluate_lab` pairs with the generated ones (the
    same ``num_samples`` items for ``seed``, the same distractors), with their own captions (the ceiling) and with
    other items' (the floor): what every family's figures read against, without a generative model (the zoo's
    manifest of a CLIP scorer records them)."""
    from lab_utils.core.data import build_dataset

    test_set = build_dataset(data_cfg, "test")
    test_idx = choose_items(num_samples, len(test_set), seed + 1, test_set.held_out_mask, held_out_fraction)
    targets = test_set.labels[test_idx]  # (n, A), as evaluate_lab chooses them
    prompts = [test_set.describe(labels, template=0) for labels in targets]
    measured = prompt_match_metrics(scorer, test_set, targets, prompts, real_images(test_set, test_idx), None,
                                    seed + 3, batch_size, distractors)
    return {"num_samples": num_samples, "seed": seed, **measured}


def eval_config(cfg: Any) -> EvalConfig:
    """The checked :class:`EvalConfig` from an ``eval:`` section (DictConfig or dict) or an EvalConfig."""
    if isinstance(cfg, EvalConfig):
        return cfg
    section = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg or {})
    return typed_section(section, EvalConfig, "eval")


def evaluate_run(run_dir: str | Path | None, eval_cfg: Any = None, pretrained: str | None = None,
                 out: str | Path | None = None) -> dict[str, Any]:
    """Evaluate the run at ``run_dir`` (its EMA weights, its data config), or the shipped model ``pretrained``,
    and write ``out`` (default ``<run_dir>/eval.json``, or ``eval-<pretrained>.json`` in the working folder). A lab
    that is not generative but measures itself (``Lab.measure``: a joint embedding, model=clip) is measured on the
    real test images instead (:func:`measure_run`)."""
    from lab_utils.harness.devices import effective_precision, pick_device, sampling_precision
    from lab_utils.harness.zoo import load_source

    cfg = eval_config(eval_cfg)
    device = pick_device(cfg.device)
    loaded = load_source(run_dir, pretrained, device=device, ema=cfg.ema)
    if loaded.cfg.model.get("name") == "evaluator":
        raise ValueError(f"{run_dir} is an evaluator run; `genlab eval` evaluates generative models")
    # <run>/checkpoints/<file>.pt -> <run>; a pretrained model's figures go to the working folder
    run_path = loaded.path.parent.parent if pretrained is None else Path(".")
    out_path = Path(out) if out else run_path / ("eval.json" if pretrained is None else f"eval-{pretrained}.json")
    if not loaded.lab.generative:  # a joint embedding (CLIP): what it measures of itself on real test images
        return measure_run(loaded, cfg, run_path if pretrained is None else None, out_path)
    check_sample_options(loaded.lab, cfg.sample_options)  # fail early
    if cfg.fid_guidance and not takes_guidance(loaded.lab):
        raise ConfigError(f"eval.fid_guidance={list(cfg.fid_guidance)}: {loaded.cfg.model.get('name')} samples "
                          "without guidance (only the diffusion families take it); leave eval.fid_guidance null")
    trained_in = (loaded.cfg.get("trainer") or {}).get("precision", "fp32")
    precision = (sampling_precision(trained_in, device) if cfg.precision is None
                 else effective_precision(cfg.precision, device))
    if cfg.evaluator_run:
        evaluator = evaluator_from_run(cfg.evaluator_run, device=device)
    else:
        quiet = [] if cfg.progress else ["trainer.progress=false"]  # an evaluator trained here shows no bar either
        evaluator = get_evaluator(loaded.cfg.data, [*cfg.evaluator_overrides, *quiet], cfg.evaluator_preset,
                                  cfg.cache_dir, device, train_if_missing=cfg.train_evaluator)
    inception = InceptionFeatures(cfg.inception_weights).to(device) if cfg.features == "inception" else None
    scorer = clip_scorer(loaded.cfg.data, cfg, device)
    result = evaluate_lab(
        loaded.lab, loaded.cfg.data, evaluator, cfg.num_samples, cfg.seed, cfg.batch_size, cfg.sample_options,
        device, kid_subset_size=cfg.kid_subset_size, kid_subsets=cfg.kid_subsets, pr_k=cfg.pr_k,
        is_splits=cfg.is_splits, held_out_fraction=cfg.held_out_fraction, inception=inception,
        model_name=loaded.cfg.model.get("name"), step=int(loaded.state["trainer"]["step"]),
        precision=precision, fid_guidance=cfg.fid_guidance, progress=cfg.progress,
        partial_samples=cfg.partial_samples, clip=scorer, r_precision_distractors=cfg.r_precision_distractors,
    )
    result.run_dir, result.checkpoint = (str(run_path) if pretrained is None else None), str(loaded.path)
    out = result.to_dict()
    out["eval_config"] = asdict(cfg)
    write_json(out, out_path)
    out["written_to"] = str(out_path)
    return out


def clip_scorer(data_cfg: Any, cfg: EvalConfig, device: torch.device) -> Optional[ClipScorer]:
    """The CLIP scorer ``eval`` asks for: ``eval.clip_run``'s, or the dataset's (``get_clip_scorer``: the zoo's, the
    cache's or trained once with ``eval.clip_preset``, else ``eval.evaluator_preset``); None with
    ``eval.clip_score=false``."""
    if not cfg.clip_score:
        return None
    if cfg.clip_run:
        return clip_scorer_from_run(cfg.clip_run, device=device)
    quiet = [] if cfg.progress else ["trainer.progress=false"]  # a scorer trained here shows no bar either
    return get_clip_scorer(data_cfg, quiet, cfg.clip_preset or cfg.evaluator_preset, cfg.cache_dir, device,
                           train_if_missing=cfg.train_evaluator)


def measure_run(loaded: Any, cfg: EvalConfig, run_path: Path | None, out_path: Path) -> dict[str, Any]:
    """``genlab eval`` of a lab that is not generative: its own :meth:`Lab.measure` on ``eval.num_samples`` real test
    items (``eval.seed``, ``eval.batch_size``), written to ``out_path`` beside the run, model and step. A lab that
    measures nothing of its own is a ConfigError."""
    from lab_utils.core.data import build_dataset

    name, started = loaded.cfg.model.get("name"), time.perf_counter()
    measurement = loaded.lab.measure(build_dataset(loaded.cfg.data, "test"), cfg.num_samples, cfg.seed,
                                     cfg.batch_size)
    if measurement is None:
        raise ConfigError(f"{name} is not a generative model and measures nothing of its own; `genlab eval` "
                          "evaluates generative models and joint embeddings (model=clip)")
    step = int(loaded.state["trainer"]["step"])
    out = {"model": name, "data": str(loaded.cfg.data.name), "step": step, **measurement.figures,
           "summary": f"{name} step {step} on {loaded.cfg.data.name}: {measurement.summary}",
           "eval_seconds": time.perf_counter() - started, "run_dir": None if run_path is None else str(run_path),
           "checkpoint": str(loaded.path), "eval_config": asdict(cfg)}
    write_json(out, out_path)
    out["written_to"] = str(out_path)
    return out


def write_json(data: dict[str, Any], path: Path) -> None:
    """Atomic (``plotting.write_file``): a write that fails (a full disk) leaves ``path`` as it was, removes the
    temporary file and raises the ``OSError`` with ``path`` named."""
    text = json.dumps(data, indent=2, default=_jsonable) + "\n"  # before any file is opened: a TypeError writes none
    write_file(path, text.encode())


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def eval_command_main(cfg: DictConfig) -> dict[str, Any]:
    """Everything ``genlab eval run=<dir> [eval.key=value ...]`` does, given the composed ``conf/eval.yaml``:
    evaluate, write ``<run>/eval.json``, print a one-line summary, return the results."""
    run, pretrained = cfg.get("run"), cfg.get("pretrained")
    if not run and pretrained is None:
        raise ConfigError("which model? pass run=<run directory or checkpoint> (e.g. genlab eval "
                          "run=runs/shapes/ddpm/<date>) or pretrained=<name> (`genlab pretrained` lists them)")
    if cfg.get("out") and not str(cfg.out).endswith(".json"):
        raise ConfigError(f"out={cfg.out}: eval writes a JSON file; give a name ending in .json")
    eval_cfg = eval_config(cfg.get("eval") or {})
    result = evaluate_run(str(run) if run else None, eval_cfg, None if pretrained is None else str(pretrained),
                          cfg.get("out"))
    print(result["summary"] if "summary" in result else summary_line(result))  # a joint embedding's own line
    print(f"wrote {result.pop('written_to')}")
    return result
