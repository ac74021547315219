"""A joint text-image embedding trained from scratch with the symmetric contrastive loss (CLIP).

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision", fig. 3:

    I_f = image_encoder(I)            # (n, F)
    T_f = text_encoder(T)             # (n, C)
    I_e = l2_normalize(I_f @ W_i)     # (n, D)
    T_e = l2_normalize(T_f @ W_t)     # (n, D)
    logits = I_e @ T_e.T * exp(t)     # (n, n)
    labels = arange(n)
    loss = (CE(logits, labels) + CE(logits.T, labels)) / 2

with the learned temperature t initialised to log(1 / 0.07) and clipped so that exp(t) <= 100 (sec. 2.5).

Bottom-up: the image encoder (a small residual CNN for 32 px images, written again here rather than imported from
the evaluator: a lab imports no other lab), the contrastive loss (math only, no parameters), the config, the
network that joins the two encoders, and the :class:`ClipLab` the harness trains (``genlab train model=clip``).
The text encoder is the lab's shared one (``labs.text_encoder``). What the embedding learnt is measured by
``labs/clip/zero_shot.py`` (``genlab eval run=<a clip run>``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lab_utils.core.lab import DataInfo, Lab, Measurement, StepContext, adam
from labs.clip.zero_shot import measure_embedding
from labs.text_encoder import TextEncoder, TextEncoderConfig, Tokenizer, encode_prompts


# ------------------------------------------------------------------------------------ image encoder
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


class ImageEncoder(nn.Module):
    """Stem, one stride-2 residual block per stage (32 -> 16 -> 8 -> 4 px), GroupNorm + SiLU, then the features:
    the final map's global mean (``pool="mean"``) or the map flattened (``pool="flatten"``: kept in place)."""

    def __init__(self, channels: int, image_size: int, width: int, channel_mults: list[int], groups: int, pool: str):
        super().__init__()
        widths = [width * m for m in channel_mults]
        self.stem = nn.Conv2d(channels, widths[0], 3, padding=1)
        blocks, previous = [], widths[0]
        for stage_width in widths:
            blocks.append(ResBlock(previous, stage_width, 2, groups))  # /2 px
            previous = stage_width
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.GroupNorm(groups, previous)
        self.pool = pool
        side = image_size // 2 ** len(widths)  # H' = W' of the final map
        self.num_features = previous * side * side if pool == "flatten" else previous  # F

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm(self.blocks(self.stem(x))))  # (N, C', H', W')
        return h.flatten(1) if self.pool == "flatten" else h.mean(dim=(2, 3))  # (N, F)


# ------------------------------------------------------------------------------------ the loss
@dataclass
class ContrastiveLoss:
    loss: torch.Tensor  # () the symmetric loss, (image->text + text->image) / 2
    image_to_text: torch.Tensor  # () CE over each image's row of logits
    text_to_image: torch.Tensor  # () CE over each text's column
    logits: torch.Tensor  # (n, n) exp(t) I_e T_e^T


def contrastive_loss(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: torch.Tensor,
                     positives: Optional[torch.Tensor] = None) -> ContrastiveLoss:
    """The symmetric InfoNCE loss of Radford et al. 2021 (fig. 3) on L2-normalised embeddings (n, D):

    $\\ell_{ij} = e^{t} \\, I_i \\cdot T_j$, $\\mathcal{L} = \\tfrac12 \\big(\\mathrm{CE}(\\ell, y) + \\mathrm{CE}(\\ell^\\top, y)\\big)$,
    $y = (0, 1, \\dots, n-1)$: the i-th image's text is the i-th text, every other text of the batch a negative.

    ``positives`` (n, n) bool, symmetric, True on the diagonal: pairs that count as matches besides (i, i) (items
    whose captions are the same string). Each row's target is then spread evenly over its positives,
    $q_{ij} = P_{ij} / \\sum_k P_{ik}$, and the CE is $-\\sum_j q_{ij} \\log \\mathrm{softmax}(\\ell_i)_j$ (a
    multi-positive target, as in SupCon, Khosla et al. 2020, eq. 2's "out" form); None: the identity, the paper's loss.
    Where positives have equal text embeddings (the same string through a deterministic encoder) their logits are
    equal and the two targets give the same loss.
    """
    n = len(image_embeddings)
    logits = logit_scale * image_embeddings @ text_embeddings.T  # exp(t) I_e T_e^T: (n, n), rows images
    if positives is None:
        labels = torch.arange(n, device=logits.device)  # y = arange(n)
        image_to_text = F.cross_entropy(logits, labels)  # each image picks its text among the n
        text_to_image = F.cross_entropy(logits.T, labels)  # each text picks its image among the n
    else:
        target = positives.to(logits.dtype)
        target = target / target.sum(dim=1, keepdim=True)  # q_ij = P_ij / sum_k P_ik: (n, n), rows sum to 1
        image_to_text = -(target * logits.log_softmax(dim=1)).sum(dim=1).mean()
        text_to_image = -(target * logits.T.log_softmax(dim=1)).sum(dim=1).mean()  # P symmetric: q^T's rows = q's
    loss = (image_to_text + text_to_image) / 2
    return ContrastiveLoss(loss=loss, image_to_text=image_to_text, text_to_image=text_to_image, logits=logits)


def same_caption(captions: list[str], device: torch.device | str | None = None) -> torch.Tensor:
    """(n, n) bool: True where two captions are the same string (the diagonal always). Only the text is read."""
    index: dict[str, int] = {}
    ids = torch.tensor([index.setdefault(caption, len(index)) for caption in captions], device=device)  # (n,)
    return ids[:, None] == ids[None, :]  # (n, n)


# ------------------------------------------------------------------------------------ config
@dataclass
class ClipConfig:
    """Schema and defaults of ``model=clip`` (the one home of its values; ``conf/model/clip.yaml`` only names it): a
    joint embedding of images and captions trained contrastively (Radford et al. 2021). Not a generative model:
    ``genlab eval`` measures it by zero-shot classification and retrieval on real test images. The presets
    (``conf/preset_model/clip_{smoke,cpu}.yaml``) change the size and the budget."""

    _target_: str = "labs.clip.ClipLab"
    name: str = "clip"
    embed_dim: int = 64  # D, the joint space both projections map into
    width: int = 32  # channels of the image encoder's first stage
    # one stride-2 stage per entry: 32 -> 64 -> 128 channels at 16, 8, 4 px
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 4])
    groups: int = 8  # GroupNorm groups (no BatchNorm: the same in train and eval mode)
    # mean: global average pooling of the final 4 x 4 map (position reaches the features through the padding's edge
    # effects); flatten: the map flattened, where a shape is kept in place. Measured on shapes, preset=cpu, 1000 test
    # images: mean 1.000 zero-shot on every attribute, 1.000 on the 93 items of held-out combinations; flatten 0.997
    # (shape) and 0.968 on the held-out combinations (16x the features, no sharing across positions)
    pool: str = "mean"
    # captions have < 12 words from a ~40-word vocabulary: a small encoder suffices
    text: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(dim=64, depth=2, heads=4))
    init_temperature: float = 0.07  # t starts at log(1 / 0.07) (Radford et al. sec. 2.5)
    max_logit_scale: float = 100.0  # t is clipped so that exp(t) <= 100 (sec. 2.5)
    # which pairs of a batch count as matches: "index" (the paper: pair i only) or "caption" (also the items whose
    # captions are the same string, a multi-positive target). With a deterministic text encoder (text.dropout = 0)
    # the two are the same loss: identical strings embed identically, so their logit columns are equal and spreading
    # a row's target over them changes nothing (tests/test_clip.py checks it). Measured: the same figures to three
    # decimals on shapes (~7 same-string pairs in a batch of 128) and Fashion-MNIST (~135). The false negatives that
    # remain, one item's labels worded by another template (~19 pairs a batch on shapes), cannot be told from the
    # strings; "caption" matters only with text dropout
    positives: str = "index"
    lr: float = 0.001  # AdamW; warm-up and grad clipping come from the trainer preset
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])  # beta2 0.98, as CLIP (sec. 2.5)
    weight_decay: float = 0.05  # decoupled, on conv/linear weights only (not on t, norms, biases, embeddings)

    def __post_init__(self) -> None:
        if self.embed_dim <= 0 or self.width <= 0 or not self.channel_mults or any(m <= 0 for m in self.channel_mults):
            raise ValueError("model.embed_dim and model.width must be positive and model.channel_mults non-empty "
                             f"and positive, got {self.embed_dim}, {self.width}, {self.channel_mults}")
        for mult in self.channel_mults:
            if (self.width * mult) % self.groups:
                raise ValueError(f"model.groups={self.groups} must divide every stage width "
                                 f"(width x channel_mults = {[self.width * m for m in self.channel_mults]})")
        if self.pool not in ("flatten", "mean"):
            raise ValueError(f"model.pool must be 'flatten' or 'mean', got {self.pool!r}")
        if self.positives not in ("index", "caption"):
            raise ValueError(f"model.positives must be 'index' or 'caption', got {self.positives!r}")
        if not 0 < self.init_temperature < 1 or not 1 < self.max_logit_scale:
            raise ValueError("model.init_temperature must be in (0, 1) and model.max_logit_scale above 1, got "
                             f"{self.init_temperature} and {self.max_logit_scale}")
        if 1 / self.init_temperature > self.max_logit_scale:
            raise ValueError(f"model.init_temperature={self.init_temperature} starts exp(t) above "
                             f"model.max_logit_scale={self.max_logit_scale}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("model.lr must be positive and model.weight_decay >= 0")


# ------------------------------------------------------------------------------------ the network
@dataclass
class ClipOutput:
    image_embeddings: torch.Tensor  # (n, D) I_e, unit rows
    text_embeddings: torch.Tensor  # (n, D) T_e, unit rows
    logit_scale: torch.Tensor  # () exp(t), at most max_logit_scale


class ClipModel(nn.Module):
    """The two encoders, each followed by a linear projection W_i, W_t into the D-dimensional joint space, and t."""

    def __init__(self, cfg: ClipConfig, channels: int, image_size: int, vocab_size: int):
        super().__init__()
        if image_size % 2 ** len(cfg.channel_mults):
            raise ValueError(f"image size {image_size} is not divisible by 2^{len(cfg.channel_mults)} "
                             "(one halving per model.channel_mults entry)")
        self.image_encoder = ImageEncoder(channels, image_size, cfg.width, cfg.channel_mults, cfg.groups, cfg.pool)
        self.text_encoder = TextEncoder(cfg.text, vocab_size)
        self.image_projection = nn.Linear(self.image_encoder.num_features, cfg.embed_dim, bias=False)  # W_i
        self.text_projection = nn.Linear(cfg.text.dim, cfg.embed_dim, bias=False)  # W_t
        # t: the log of the logit scale (the inverse temperature), logits = exp(t) I_e T_e^T
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.init_temperature)))
        self.max_log_scale = math.log(cfg.max_logit_scale)

    def logit_scale(self) -> torch.Tensor:
        """exp(t), with t clipped at log(max_logit_scale): the logits are never scaled by more than 100."""
        return self.log_scale.clamp(max=self.max_log_scale).exp()

    def clip_temperature(self) -> None:
        """Clip t in place after an optimiser step (as open_clip does), so it never drifts past the bound."""
        with torch.no_grad():
            self.log_scale.clamp_(max=self.max_log_scale)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) in [-1, 1] -> I_e (n, D), unit rows."""
        features = self.image_encoder(images)  # I_f: (n, F)
        return F.normalize(self.image_projection(features), dim=-1)  # I_e = l2_normalize(I_f W_i): (n, D)

    def embed_texts(self, tokenizer: Tokenizer, captions: list[str]) -> torch.Tensor:
        """captions -> T_e (n, D), unit rows; the text feature is the encoder's pooled vector (masked token mean)."""
        features = encode_prompts(tokenizer, self.text_encoder, list(captions)).pooled  # T_f: (n, C)
        return F.normalize(self.text_projection(features), dim=-1)  # T_e = l2_normalize(T_f W_t): (n, D)


# ------------------------------------------------------------------------------------ the lab
class ClipLab(Lab):
    """CLIP on the lab's datasets, trained by the harness like any other family (``genlab train model=clip``).

    Training reads only the batch's images and captions, never its labels. Not a generative model: :meth:`sample`
    gives blank images, and :meth:`measure` is what ``genlab eval`` reports (zero-shot classification and
    retrieval on real test images, ``labs.clip.zero_shot``).
    """

    Config = ClipConfig
    ddp_find_unused_parameters = False  # every update uses every parameter
    generative = False  # the harness's sample grids mean nothing for this lab

    def __init__(self, config: ClipConfig | Any, data_info: DataInfo):
        super().__init__(config, data_info)
        self.tokenizer = Tokenizer(data_info.vocab, max_length=self.config.text.max_length)
        self.clip = ClipModel(self.config, data_info.channels, data_info.image_size, self.tokenizer.vocab_size)
        self._warned_sample = False

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        cfg = self.config
        decay, no_decay = [], []
        for name, param in self.clip.named_parameters():
            # conv and linear weights decay; t, biases, norms and the token/position tables do not
            is_table = name.endswith("tok_emb.weight") or name.endswith("pos_emb.weight")
            (decay if param.ndim > 1 and not is_table else no_decay).append(param)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return {"model": adam(groups, lr=cfg.lr, betas=tuple(cfg.betas))}

    def ema_modules(self) -> list[str]:
        return ["clip"]

    def forward(self, images: torch.Tensor, captions: list[str]) -> ClipOutput:
        return ClipOutput(image_embeddings=self.clip.embed_images(images),
                          text_embeddings=self.clip.embed_texts(self.tokenizer, captions),
                          logit_scale=self.clip.logit_scale())

    def loss(self, images: torch.Tensor, captions: list[str]) -> ContrastiveLoss:
        """The contrastive loss of a batch of (image, caption) pairs, with the configured positives."""
        out = self(images, captions)
        positives = same_caption(captions, images.device) if self.config.positives == "caption" else None
        return contrastive_loss(out.image_embeddings, out.text_embeddings, out.logit_scale, positives)

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        images, captions = batch["image"], list(batch["caption"])  # (n, C, H, W), n strings; labels unused

        # (1) one update of both encoders, both projections and t: minimise (CE(l, y) + CE(l^T, y)) / 2
        def clip_loss() -> dict[str, torch.Tensor]:
            out = self.loss(images, captions)
            labels = torch.arange(len(captions), device=out.logits.device)
            return {"loss": out.loss, "stats/image_to_text": out.image_to_text, "stats/text_to_image":
                    out.text_to_image, "stats/logit_scale": self.clip.logit_scale(),
                    "stats/batch_acc": (out.logits.argmax(dim=1) == labels).float().mean()}

        out = ctx.optimize("model", clip_loss)
        self.clip.clip_temperature()  # (2) keep exp(t) <= max_logit_scale
        return {name: value.detach() for name, value in out.items()}

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) in [-1, 1] -> (n, D) unit image embeddings, in eval mode's network (no gradients)."""
        return self.clip.embed_images(images.to(self.device))

    @torch.no_grad()
    def embed_texts(self, captions: list[str]) -> torch.Tensor:
        """captions -> (n, D) unit text embeddings (no gradients)."""
        return self.clip.embed_texts(self.tokenizer, list(captions))

    def measure(self, test_set: Any, num_items: int, seed: int, batch_size: int) -> Measurement:
        """Zero-shot classification per attribute and retrieval recall on ``num_items`` real test images
        (:func:`labs.clip.zero_shot.measure_embedding`)."""
        return measure_embedding(self, test_set, num_items, seed, batch_size)

    @torch.no_grad()
    def sample(self, prompts: list[str], generator: torch.Generator | None = None, **options: Any) -> torch.Tensor:
        """Not a generative model: blank (all -1) images, so the harness's sample grids still work."""
        if not self._warned_sample:
            warnings.warn("CLIP is a joint embedding, not a generative model: its 'samples' are blank images "
                          "(measure it with `genlab eval run=<this run>`)", stacklevel=2)
            self._warned_sample = True
        size = self.data_info.image_size
        return torch.full((len(prompts), self.data_info.channels, size, size), -1.0, device=self.device)
