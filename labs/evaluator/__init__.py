"""The evaluator family: the classifier whose features and logits the metrics use (``model=evaluator``).

    lab.py   EvaluatorConfig, EvaluatorNet, EvaluatorLab (trained by the harness) and the frozen Evaluator

Content, like the generative families: it imports lab_utils' core only. ``lab_utils.commands.evaluation`` trains,
caches and loads it (``get_evaluator``) and computes the metrics on its features.
"""

from .lab import (
    Evaluator, EvaluatorConfig, EvaluatorLab, EvaluatorNet, EvaluatorOutput, joint_log_probs, predict_from_logits,
    dequantize, quantize, random_translate, real_images,
)

__all__ = [
    "Evaluator", "EvaluatorConfig", "EvaluatorLab", "EvaluatorNet", "EvaluatorOutput", "joint_log_probs",
    "dequantize", "predict_from_logits", "quantize", "random_translate", "real_images",
]
