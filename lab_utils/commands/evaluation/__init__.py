"""Evaluation: a classifier trained on the dataset as the feature network, and the metrics on its features.

    (labs/evaluator: EvaluatorLab, trained by the harness as ``genlab train model=evaluator``, and the
                  frozen Evaluator wrapper, uint8 images in, features and per-attribute logits out)
    cache.py      get_evaluator: trained once per dataset and settings, then cached (harness.cached_run)
    clip_scorer.py  get_clip_scorer: the CLIP model that reads the CLIP score and R-precision (labs/clip/score.py),
                  the zoo's for shapes, else trained once and cached like the evaluator
    metrics.py    FID, KID, IS (through torchmetrics, on precomputed features), the same equations
                  written out, precision/recall (k-NN manifolds) and prompt alignment
    exercises.py  the checks of notebook 05's metric exercises
    evaluate.py   evaluate_lab / evaluate_run: generated vs real, beside real vs real at the same count;
                  eval_command_main is ``genlab eval run=<dir>``

>>> from lab_utils.commands.evaluation import evaluate_run
>>> result = evaluate_run("runs/shapes/ddpm/<date>", {"num_samples": 500})   # writes eval.json
"""

from lab_utils.commands.evaluation.evaluate import (
    EvalConfig, EvalResult, InceptionFeatures, choose_items, eval_command_main, eval_config, evaluate_lab,
    evaluate_run, nfe_per_sample, summary_line,
)
from lab_utils.commands.evaluation.cache import (
    evaluator_config, evaluator_from_run, get_evaluator, load_evaluator, measure_accuracy,
)
from lab_utils.commands.evaluation.clip_scorer import (
    clip_scorer_config, clip_scorer_from_run, get_clip_scorer, load_clip_scorer,
)
from labs.evaluator import (
    Evaluator, EvaluatorConfig, EvaluatorLab, EvaluatorNet, EvaluatorOutput, joint_log_probs, predict_from_logits,
    quantize, random_translate, real_images,
)
from lab_utils.core.metrics import (
    Passthrough, PrecisionRecall, fid, frechet_distance, frechet_distance_low_rank, gaussian_stats, inception_score,
    kid, kid_unbiased, knn_radii, manifold_coverage, polynomial_kernel, precision_recall, prompt_alignment, seeded,
)

__all__ = [
    "EvalConfig", "EvalResult", "Evaluator", "EvaluatorConfig", "EvaluatorLab",
    "EvaluatorNet", "EvaluatorOutput", "InceptionFeatures", "Passthrough", "PrecisionRecall", "choose_items",
    "clip_scorer_config", "clip_scorer_from_run", "get_clip_scorer", "load_clip_scorer",
    "eval_command_main", "eval_config", "evaluate_lab", "evaluate_run", "evaluator_config",
    "evaluator_from_run", "fid", "frechet_distance", "frechet_distance_low_rank",
    "gaussian_stats", "get_evaluator", "inception_score", "joint_log_probs", "kid", "kid_unbiased", "knn_radii",
    "load_evaluator", "manifold_coverage", "measure_accuracy", "nfe_per_sample", "polynomial_kernel",
    "precision_recall", "predict_from_logits", "prompt_alignment", "quantize", "random_translate",
    "real_images", "seeded", "summary_line",
]
