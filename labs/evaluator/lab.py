"""The evaluator network: a classifier trained on the dataset's own real images, then frozen.

Inception-v3 features are the usual yardstick for FID/IS, but its weights cannot be downloaded
here and it was never meant for 32 x 32 pictures of shapes. As fast.ai's course does for
Fashion-MNIST, we train a small CNN on the real *training* images instead, with one
classification head per attribute of the dataset (shapes: shape, colour, size, position;
Fashion-MNIST: class). Its penultimate activations are the features of FID, KID and
precision/recall; its logits feed the Inception Score and prompt alignment.

    EvaluatorNet   the CNN: pre-activation residual blocks with GroupNorm (no BatchNorm, so it
                   behaves the same under DDP and in eval mode), global average pooling -> features
    EvaluatorLab   the family object the harness trains (``genlab train model=evaluator``):
                   cross-entropy summed over the heads, $\\mathcal{L} = \\sum_a \\mathrm{CE}(y_a, p_\\theta(y_a|x))$
    Evaluator      the frozen wrapper that metrics use: takes uint8 images, never leaves eval mode

Training, caching and loading (``get_evaluator``) live in ``lab_utils/commands/evaluation/cache.py``: this lab is
content (a model family like the others, built through the registry); the evaluation application uses it.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lab_utils.core.lab import DataInfo, Lab, StepContext, adam



# ------------------------------------------------------------------------------------ config
@dataclass
class EvaluatorConfig:
    """Schema and defaults of ``model=evaluator`` (the one home of its values; ``conf/model/evaluator.yaml`` only
    names it): the classifier whose features and logits the evaluation metrics use (FID, KID, precision/recall;
    IS, prompt alignment), trained on the dataset's real training images with one head per attribute. Not a
    generative model. ``genlab eval`` trains and caches it by itself the first time; ``genlab train model=evaluator
    data=shapes data.held_out=[]`` trains one as a plain run (use it with ``genlab eval eval.evaluator_run=<dir>``).
    The evaluator must see every attribute combination: trained without "blue triangle" it reads only ~57% of blue
    triangles' shapes right."""

    _target_: str = "labs.evaluator.EvaluatorLab"
    name: str = "evaluator"
    width: int = 32  # channels of the first stage
    # one stage per entry, /2 px between: 32 -> 64 -> 128 channels at 16, 8, 4 px, so 128 pooled features
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 4])
    blocks_per_stage: int = 1  # pre-activation residual blocks per stage
    # 2: the first stage already works at half resolution (4x cheaper, enough for 32 px images), 1: full
    first_stage_stride: int = 2
    groups: int = 8  # GroupNorm groups (no BatchNorm: the same behaviour in train/eval mode and under DDP)
    dropout: float = 0.1  # on the pooled features, before the heads
    lr: float = 0.002  # AdamW; warm-up and grad clipping come from the trainer preset
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.05  # decoupled (AdamW), on conv/linear weights only
    # Szegedy et al. 2016, sec. 7: calmer logits, a better-calibrated IS / alignment reading
    label_smoothing: float = 0.1
    # augmentation: translate training images by up to this many pixels (0 = off); shapes' positions are 7 px apart
    random_shift: int = 2
    # augmentation: horizontal flips, off: they would swap shapes' left/right labels (never on such datasets)
    random_flip: bool = False

    def __post_init__(self) -> None:
        if self.width <= 0 or self.blocks_per_stage <= 0 or not self.channel_mults:
            raise ValueError("model.width, model.blocks_per_stage must be positive and model.channel_mults non-empty")
        if any(m <= 0 for m in self.channel_mults):
            raise ValueError(f"model.channel_mults must be positive, got {self.channel_mults}")
        for mult in self.channel_mults:
            if (self.width * mult) % self.groups:
                raise ValueError(f"model.groups={self.groups} must divide every stage width "
                                 f"(width x channel_mults = {[self.width * m for m in self.channel_mults]})")
        if not 0 <= self.dropout < 1 or not 0 <= self.label_smoothing < 1:
            raise ValueError("model.dropout and model.label_smoothing must be in [0, 1)")
        if self.first_stage_stride not in (1, 2):
            raise ValueError(f"model.first_stage_stride must be 1 or 2, got {self.first_stage_stride}")
        if self.lr <= 0 or self.weight_decay < 0 or self.random_shift < 0:
            raise ValueError("model.lr must be positive, model.weight_decay and model.random_shift >= 0")


@dataclass
class EvaluatorOutput:
    features: torch.Tensor  # (N, F) penultimate activations: FID, KID, precision/recall
    logits: dict[str, torch.Tensor]  # attribute -> (N, K_a): IS, prompt alignment


# ------------------------------------------------------------------------------------ network
class ResBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016b): x + conv(act(norm(conv(act(norm(x))))))."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        same = in_channels == out_channels and stride == 1
        self.skip = nn.Identity() if same else nn.Conv2d(in_channels, out_channels, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (N, C_out, H/s, W/s)
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class EvaluatorNet(nn.Module):
    """Stem, stages of residual blocks (each starting with a stride-2 block), GroupNorm + SiLU, global pooling, heads.

    With ``channel_mults=[1, 2, 4]`` and ``first_stage_stride=2`` a 32 px image is seen at 16, 8 and 4 px
    with width x 1, 2, 4 channels; the features are the 4 x width pooled channels.
    """

    def __init__(self, cfg: EvaluatorConfig, channels: int, heads: dict[str, int]):
        super().__init__()
        widths = [cfg.width * m for m in cfg.channel_mults]
        self.stem = nn.Conv2d(channels, widths[0], 3, padding=1)
        blocks, previous = [], widths[0]
        for stage, width in enumerate(widths):
            for index in range(cfg.blocks_per_stage):
                downsample = index == 0 and (stage > 0 or cfg.first_stage_stride == 2)  # 32 -> 16 -> 8 -> 4 px
                stride = 2 if downsample else 1
                blocks.append(ResBlock(previous, width, stride, cfg.groups))
                previous = width
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.GroupNorm(cfg.groups, previous)
        self.dropout = nn.Dropout(cfg.dropout)
        self.heads = nn.ModuleDict({name: nn.Linear(previous, k) for name, k in heads.items()})
        self.num_features = previous  # F

    def forward(self, x: torch.Tensor) -> EvaluatorOutput:
        h = self.blocks(self.stem(x))  # (N, F, H', W')
        features = F.silu(self.norm(h)).mean(dim=(2, 3))  # global average pool: (N, F)
        h = self.dropout(features)
        logits = {name: head(h) for name, head in self.heads.items()}  # attribute -> (N, K_a)
        return EvaluatorOutput(features=features, logits=logits)


def random_translate(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Shift every image by its own integer (dx, dy) in [-max_shift, max_shift], edges replicated.

    Uses the global RNG, so the harness's seed (and its exact resumption) covers it.
    """
    if max_shift <= 0:
        return x
    N, C, H, W = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")  # (N, C, H + 2s, W + 2s)
    shifts = torch.randint(0, 2 * max_shift + 1, (N, 2), device=x.device)  # offsets into the padding
    rows = torch.arange(H, device=x.device)[None, :] + shifts[:, :1]  # (N, H)
    cols = torch.arange(W, device=x.device)[None, :] + shifts[:, 1:]  # (N, W)
    batch = torch.arange(N, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)


# ------------------------------------------------------------------------------------ the lab
class EvaluatorLab(Lab):
    """A classifier with one head per attribute, trained by the harness like any other family.

    $\\mathcal{L}(\\theta) = \\sum_{a \\in \\text{attributes}} \\mathrm{CE}_\\epsilon\\big(y_a, \\mathrm{softmax}(f_a(x))\\big)$
    with label smoothing $\\epsilon$. It is not a generative model: see :meth:`sample`.
    """

    Config = EvaluatorConfig
    ddp_find_unused_parameters = False  # every update uses every parameter
    generative = False  # the harness's sample grids mean nothing for this lab

    def __init__(self, config: EvaluatorConfig | Any, data_info: DataInfo):
        super().__init__(config, data_info)
        if not data_info.attributes:
            raise ValueError(f"dataset {data_info.name!r} has no attributes to classify")
        heads = {name: len(values) for name, values in data_info.attributes.items()}
        self.net = EvaluatorNet(self.config, data_info.channels, heads)
        self._warned_sample = False

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        cfg = self.config
        decay = [p for p in self.net.parameters() if p.ndim > 1]  # conv and linear weights
        no_decay = [p for p in self.net.parameters() if p.ndim <= 1]  # biases, GroupNorm scales and shifts
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return {"model": adam(groups, lr=cfg.lr, betas=tuple(cfg.betas))}

    def ema_modules(self) -> list[str]:
        return ["net"]

    def forward(self, images: torch.Tensor) -> EvaluatorOutput:
        """(N, C, H, W) images in [-1, 1] -> features (N, F) and logits per attribute."""
        return self.net(images)

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Summed cross-entropy over the heads; ``labels`` (N, A) follow ``data_info.attributes``."""
        out = self.net(images)
        loss, accuracy = images.new_zeros(()), {}
        for column, (name, logits) in enumerate(out.logits.items()):
            target = labels[:, column]  # (N,)
            loss = loss + F.cross_entropy(logits, target, label_smoothing=self.config.label_smoothing)
            accuracy[name] = (logits.argmax(dim=1) == target).float().mean()
        return loss, accuracy

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        x = random_translate(batch["image"], self.config.random_shift)  # (N, C, H, W)
        if self.config.random_flip:
            flip = torch.rand(len(x), device=x.device) < 0.5  # global RNG
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)

        def classification_loss() -> dict[str, torch.Tensor]:
            loss, accuracy = self.loss(x, batch["labels"])
            return {"loss": loss, **{f"stats/acc_{name}": acc for name, acc in accuracy.items()}}

        out = ctx.optimize("model", classification_loss)
        return {name: value.detach() for name, value in out.items()}

    @torch.no_grad()
    def sample(self, prompts: list[str], generator: torch.Generator | None = None, **options: Any) -> torch.Tensor:
        """Not a generative model: blank (all -1) images, so the harness's sample grids still work.

        The harness writes a sample grid at the end of every run; a classifier has nothing to show
        there. ``genlab sample`` on an evaluator run gets the same blank images and a warning.
        """
        if not self._warned_sample:
            warnings.warn("the evaluator is a classifier, not a generative model: its 'samples' are blank "
                          "images (use it through lab_utils.commands.evaluation instead)", stacklevel=2)
            self._warned_sample = True
        size = self.data_info.image_size
        return torch.full((len(prompts), self.data_info.channels, size, size), -1.0, device=self.device)


# ------------------------------------------------------------------------------------ frozen wrapper
def quantize(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) float in [-1, 1] -> uint8, clamped and rounded like ``lab_utils.core.plotting.to_uint8``.

    uint8 input is returned as is, so real and generated images always go through the same step.
    """
    if images.dtype == torch.uint8:
        return images
    images = images.detach().float().clamp(-1, 1)
    return ((images + 1) * 127.5).round().to(torch.uint8)  # [-1, 1] -> {0..255}


def dequantize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float in [-1, 1]: the inverse of :func:`quantize` on its outputs."""
    return images.float() / 127.5 - 1.0  # {0..255} -> [-1, 1]


def joint_log_probs(logits: dict[str, torch.Tensor]) -> torch.Tensor:
    """Log-probabilities over every combination of the heads' classes, (N, prod_a K_a).

    The heads are independent given the image, so $\\log p(y|x) = \\sum_a \\log p(y_a|x)$ for
    $y = (y_1, \\dots, y_A)$; the last attribute varies fastest (row-major, like ``itertools.product``).
    """
    joint = None
    for head in logits.values():
        log_p = head.float().log_softmax(dim=1)  # (N, K_a)
        joint = log_p if joint is None else (joint[:, :, None] + log_p[:, None, :]).flatten(1)  # (N, K_1...K_a)
    return joint


class Evaluator(nn.Module):
    """A trained :class:`EvaluatorNet`, frozen: no gradients, and always in eval mode.

    It takes **uint8** images (N, C, H, W) (what torchmetrics passes around) and converts them
    to [-1, 1] itself; float images are first clamped and quantised (:func:`quantize`), so real
    and generated images are treated identically.

    For the Inception Score the evaluator's "classes" are the joint over all heads
    (:meth:`joint_log_probs`): on ``shapes`` that is 3 x 8 x 2 x 9 = 432 classes, on
    Fashion-MNIST the 10 classes of its single head.
    """

    def __init__(self, net: EvaluatorNet, attributes: dict[str, list[str]], key: str = "",
                 test_accuracy: Optional[dict[str, float]] = None, info: Optional[dict[str, Any]] = None):
        super().__init__()
        self.net = net
        self.attributes = {name: list(values) for name, values in attributes.items()}
        self.key = key
        self.test_accuracy = dict(test_accuracy or {})  # attribute (and "all") -> accuracy on the test split
        self.info = dict(info or {})  # what evaluator.json holds
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "Evaluator":
        """Stays in eval mode whatever the parent asks (dropout off, like torchmetrics' NoTrainInceptionV3)."""
        return super().train(False)

    @classmethod
    def from_lab(cls, lab: EvaluatorLab, **kwargs: Any) -> "Evaluator":
        """A frozen *copy* of the lab's network (freezing the lab's own would stop its training)."""
        return cls(copy.deepcopy(lab.net), lab.data_info.attributes, **kwargs)

    @property
    def num_features(self) -> int:
        return self.net.num_features

    @property
    def num_classes(self) -> int:
        """Classes of the Inception Score: the product of the heads' class counts."""
        count = 1
        for values in self.attributes.values():
            count *= len(values)
        return count

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> EvaluatorOutput:
        x = dequantize(quantize(images).to(self.device))  # (N, C, H, W) in [-1, 1], on the 8-bit grid
        return self.net(x)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, F) penultimate features."""
        return self(images).features

    def logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """attribute -> (N, K_a)."""
        return self(images).logits

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(N, A) predicted labels, columns in the order of ``attributes``."""
        return predict_from_logits(self(images).logits)

    def joint_log_probs(self, images: torch.Tensor) -> torch.Tensor:
        """(N, prod_a K_a) log p(y|x) over the joint classes (see :func:`joint_log_probs`)."""
        return joint_log_probs(self(images).logits)

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 500) -> EvaluatorOutput:
        """:meth:`forward` in batches, results on the CPU: one pass per image set feeds every metric."""
        outs = [self(images[start:start + batch_size]) for start in range(0, len(images), batch_size)]
        return EvaluatorOutput(
            features=torch.cat([o.features.cpu() for o in outs]),
            logits={name: torch.cat([o.logits[name].cpu() for o in outs]) for name in self.attributes},
        )


def predict_from_logits(logits: dict[str, torch.Tensor]) -> torch.Tensor:
    """attribute -> (N, K_a) logits to (N, A) argmax labels."""
    return torch.stack([head.argmax(dim=1) for head in logits.values()], dim=1)


def real_images(dataset: Any, indices: Sequence[int]) -> torch.Tensor:
    """Items ``indices`` of a dataset as (N, C, S, S) uint8, quantised exactly like generated images."""
    return torch.stack([quantize(dataset[int(i)]["image"][None])[0] for i in indices])
