"""The common dataset interface: images in [-1, 1] with a caption and attribute labels.

Every dataset of the lab is a :class:`CaptionedDataset`. Item ``i`` is

    {"image": (C, S, S) float in [-1, 1], "caption": str, "labels": (A,) long}

where the ``A`` label columns follow ``dataset.attributes`` (an ordered dict
attribute -> value names) and the caption is written from the labels by one of the
dataset's templates, picked by a seeded hash of the index (so a resumed run sees the
same captions). Images are kept decoded as one uint8 tensor and converted per item:

    x = p / 127.5 - 1                    # {0..255} -> [-1, 1]
    x = pad(x, value=-1)                 # 28 x 28 sources -> 32 x 32 (background value)
    x = resize(x, image_size)            # bilinear, antialiased, only if sizes differ

A dataset whose config has ``random_flip: true`` (CIFAR-10; never ``shapes``, whose captions say left and
right) has its train split mirrored left-right, item by item with probability 1/2, by the trainer's stream
(:mod:`lab_utils.harness.data_stream`: a coin per (run seed, epoch, item), the same after a resume and whatever the
number of loader workers). The dataset itself never flips: ``dataset[i]`` (evaluation's real images,
``genlab data``, any ``DataLoader`` of your own) is always the item as stored.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from lab_utils.core.data.captions import build_vocab, fix_articles, pick_template
from lab_utils.core.lab import DataInfo
from lab_utils.core.schema import typed_section

SPLITS = ("train", "test")


class DataNotFound(FileNotFoundError):
    """A dataset's files are not where we looked, and downloading was not allowed or failed."""


class CorruptData(ValueError):
    """A dataset file exists but cannot be decoded (wrong magic number, truncated, ...)."""


@dataclass
class DataConfig:
    """Fields shared by every dataset's ``Config`` (the schema of ``cfg.data``)."""

    name: str = ""  # the dataset: shapes | fashion_mnist | mnist | cifar10
    root: Optional[str] = None  # folder with the dataset's files (null: the genlab cache)
    download: bool = False  # allow torchvision to download missing files into root
    image_size: int = 32  # S of the (C, S, S) images
    subset: Optional[int] = None  # use only the first N items of the split (tests, smoke runs)
    seed: int = 0  # seeds the caption-template choice (and, for shapes, the drawing)

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 8:
            raise ValueError(f"data.image_size must be an integer >= 8, got {self.image_size!r}")
        if self.subset is not None and self.subset <= 0:
            raise ValueError(f"data.subset must be a positive number of items or null, got {self.subset}")


# Data keys that say where files are, not what the pixels and labels are: the evaluator cache leaves them out of
# its key, and a resumed run may change them. Of these, the ones that choose where genlab *writes*, with the value
# a file's config gets instead: a checkpoint cannot turn downloads on or move the dataset cache elsewhere.
LOCATION_KEYS = ("root", "download", "cache_dir", "system_dirs")
WRITE_LOCATIONS = {"download": False, "cache_dir": None}


def without_write_locations(data: dict[str, Any]) -> dict[str, Any]:
    """A data config read from a file, with :data:`WRITE_LOCATIONS` set to this machine's defaults."""
    return {**data, **{key: value for key, value in WRITE_LOCATIONS.items() if key in data}}


def uint8_to_images(pixels: torch.Tensor, pad_to: Optional[int], image_size: int) -> torch.Tensor:
    """(B, C, H, W) uint8 -> (B, C, image_size, image_size) float in [-1, 1] on ``pixels``' device (see the module
    docstring): what ``dataset[i]`` computes for one item, and the on-device stream for a batch."""
    images = pixels.float() / 127.5 - 1.0  # {0, ..., 255} -> [-1, 1]
    if pad_to is not None and images.shape[-1] < pad_to:
        before = (pad_to - images.shape[-1]) // 2
        after = pad_to - images.shape[-1] - before
        images = F.pad(images, (before, after, before, after), value=-1.0)  # background is -1
    if images.shape[-1] != image_size:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                               antialias=True, align_corners=False)  # (B, C, S, S)
    return images


def uint8_to_image(pixels: torch.Tensor, pad_to: Optional[int], image_size: int) -> torch.Tensor:
    """(C, H, W) uint8 -> (C, image_size, image_size) float in [-1, 1]: :func:`uint8_to_images` of one item."""
    return uint8_to_images(pixels[None], pad_to, image_size)[0]  # (C, S, S)


class CaptionedDataset(Dataset):
    """Base class: holds ``pixels`` (N, C, H, W) uint8 and ``labels`` (N, A) long; subclasses fill them.

    A subclass sets the class attributes and implements :meth:`caption_fields`; templates
    are ``str.format`` patterns over those fields (``"a photo of a {name}"``).
    """

    name: ClassVar[str]  # the key in ``lab_utils.core.data.DATASETS``
    Config: ClassVar[type] = DataConfig  # the dataclass schema of ``cfg.data``
    channels: ClassVar[int]
    attributes: ClassVar[dict[str, list[str]]]  # attribute -> value names; label column order
    templates: ClassVar[tuple[str, ...]]  # caption templates; template 0 is the canonical one
    pad_to: ClassVar[Optional[int]] = None  # pad smaller sources to this size (28 -> 32)

    def __init__(self, cfg: Any, split: str):
        cfg = self.make_config(cfg)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if cfg.name != self.name:
            raise ValueError(f"{type(self).__name__} got a config for dataset {cfg.name!r}")
        self.cfg = cfg
        self.split = split
        self.image_size = cfg.image_size
        self.pixels = torch.zeros(0, self.channels, cfg.image_size, cfg.image_size, dtype=torch.uint8)
        self.labels = torch.zeros(0, len(self.attributes), dtype=torch.long)
        self.held_out_mask = torch.zeros(0, dtype=torch.bool)

    @classmethod
    def make_config(cls, cfg: Any) -> Any:
        """``cls.Config`` from itself, a DictConfig (``cfg.data``) or a plain dict, checked by the schema."""
        if isinstance(cfg, cls.Config):
            return cfg
        if not isinstance(cfg, DictConfig):
            cfg = OmegaConf.create(cfg)
        return typed_section(cfg, cls.Config, "data")  # raises ConfigError

    def _set_data(self, pixels: torch.Tensor, labels: torch.Tensor) -> None:
        """Keep the first ``cfg.subset`` items of (N, C, H, W) uint8 ``pixels`` and (N, A) ``labels``."""
        n = len(pixels) if self.cfg.subset is None else min(self.cfg.subset, len(pixels))
        self.pixels = pixels[:n].contiguous()
        self.labels = labels[:n].long().contiguous()
        self.held_out_mask = self.is_held_out(self.labels)

    # --- items ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "image": uint8_to_image(self.pixels[index], self.pad_to, self.image_size),  # (C, S, S)
            "caption": self.caption(index),
            "labels": self.labels[index].clone(),  # (A,)
        }

    @property
    def random_flip(self) -> bool:
        """Whether the trainer's stream mirrors this split's items at random (the train split of a dataset with
        ``random_flip: true``); ``dataset[i]`` itself is never mirrored."""
        return self.split == "train" and bool(getattr(self.cfg, "random_flip", False))

    def caption(self, index: int) -> str:
        """The caption of item ``index``: its labels written with a template chosen by (seed, index)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        template = pick_template(self.cfg.seed, index, len(self.templates))
        return self.describe(self.labels[index], template)

    # --- captions ------------------------------------------------------------------------
    def caption_fields(self, labels: Sequence[int]) -> dict[str, str]:
        """The words a template is filled with, for one labels vector."""
        raise NotImplementedError

    def describe(self, labels: Sequence[int] | torch.Tensor, template: int | None = None) -> str:
        """The caption for a labels vector (template 0 unless ``template`` is given)."""
        values = [int(v) for v in labels]
        if len(values) != len(self.attributes):
            raise ValueError(f"expected {len(self.attributes)} labels {list(self.attributes)}, got {values}")
        for value, (attribute, names) in zip(values, self.attributes.items()):
            if not 0 <= value < len(names):
                raise ValueError(f"label {value} out of range for attribute {attribute!r} ({len(names)} values)")
        pattern = self.templates[0 if template is None else template]
        return fix_articles(pattern.format(**self.caption_fields(values)))

    def caption_corpus(self) -> list[str]:
        """Every caption the dataset can produce: all templates x all attribute combinations."""
        ranges = [range(len(names)) for names in self.attributes.values()]
        corpus = (self.describe(labels, t) for labels in itertools.product(*ranges)
                  for t in range(len(self.templates)))
        return list(dict.fromkeys(corpus))  # unique, in a fixed order

    def default_prompts(self) -> list[str]:
        """Fixed prompts for the sample grids made during training."""
        raise NotImplementedError

    def is_held_out(self, labels: torch.Tensor) -> torch.Tensor:
        """(N, A) or (A,) labels -> bool (N,) or (): is this an attribute combination held out of training?"""
        return torch.zeros(labels.shape[:-1], dtype=torch.bool)

    def data_info(self) -> DataInfo:
        """What a model needs to know about this dataset (saved with every checkpoint)."""
        return DataInfo(
            name=self.name,
            channels=self.channels,
            image_size=self.image_size,
            attributes={key: list(values) for key, values in self.attributes.items()},
            vocab=build_vocab(self.caption_corpus()),
            prompts=self.default_prompts(),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, n={len(self)}, image_size={self.image_size})"


class ClassCaptionedDataset(CaptionedDataset):
    """A classification dataset with a single attribute (``"class"`` or ``"digit"``).

    Templates use ``{name}`` (the class name, "t-shirt/top" written "t-shirt or top") and
    ``{index}`` (the class number, "the number 7").
    """

    def caption_fields(self, labels: Sequence[int]) -> dict[str, str]:
        (index,) = labels
        (names,) = self.attributes.values()
        return {"name": names[index].replace("/", " or "), "index": str(index)}

    def default_prompts(self) -> list[str]:
        """One prompt per class, cycling through the templates."""
        (names,) = self.attributes.values()
        return [self.describe([k], k % len(self.templates)) for k in range(len(names))]


def find_or_download(
    title: str,
    dirs: Sequence[Path],
    has_files: Callable[[Path], bool],
    download: Optional[Callable[[], None]],
    ways: Sequence[str],
    wanted: str,
) -> Path:
    """The first folder of ``dirs`` where ``has_files`` holds; else download (if allowed) and look again.

    Raises :class:`DataNotFound` naming ``wanted`` (the files), every folder searched and the
    ``ways`` to get the data.
    """
    for folder in dirs:
        if has_files(folder):
            return folder
    failure = ""
    if download is not None:
        try:
            download()
        except Exception as err:  # no network, disk full, ...: report it with the other ways
            failure = f"\nThe download failed: {type(err).__name__}: {err}"
        for folder in dirs:
            if has_files(folder):
                return folder
    searched = "\n".join(f"  {folder}" for folder in dirs)
    steps = "\n".join(f"  {number}. {way}" for number, way in enumerate(ways, 1))
    raise DataNotFound(
        f"{title} not found: looked for {wanted} in\n{searched}{failure}\n"
        f"Get it one of these ways:\n{steps}"
    )
