"""Captioned image datasets: images in [-1, 1], a caption and attribute labels per item.

>>> from lab_utils.core.config import compose
>>> cfg = compose(["data=shapes", "data.subset=64"], config_name="dataview")
>>> dataset = build_dataset(cfg.data, "train")
>>> item = dataset[0]        # {"image": (3, 32, 32), "caption": "a small red ...", "labels": (4,)}

``DATASETS`` maps ``cfg.data.name`` to the dataset class; each class carries its config
schema as ``Class.Config`` (a dataclass, checked by ``lab_utils.core.config.validate``).
"""

from __future__ import annotations

from dataclasses import is_dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lab_utils.core.data.base import CaptionedDataset, CorruptData, DataConfig, DataNotFound, uint8_to_image
from lab_utils.core.data.captions import SPECIAL_TOKENS, build_vocab, words
from lab_utils.core.data.cifar import CIFAR10Dataset
from lab_utils.core.data.idx import FashionMNISTDataset, MNISTDataset, read_idx
from lab_utils.core.data.shapes import ShapesDataset
from lab_utils.core.schema import ConfigError

DATASETS: dict[str, type[CaptionedDataset]] = {
    cls.name: cls for cls in (ShapesDataset, FashionMNISTDataset, MNISTDataset, CIFAR10Dataset)
}


def dataset_class(name: Any) -> type[CaptionedDataset]:
    """The dataset class registered as ``name``; :class:`ConfigError` lists the valid names."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset `data.name={name}`; valid names: {', '.join(DATASETS)}")
    return DATASETS[name]


def build_dataset(data_cfg: Any, split: str) -> CaptionedDataset:
    """The ``split`` ("train" or "test") of the dataset that ``data_cfg`` describes.

    ``data_cfg`` is ``cfg.data`` (a DictConfig, validated or not), a plain dict, or the
    dataset's ``Config`` dataclass itself.
    """
    if is_dataclass(data_cfg) and not isinstance(data_cfg, type):
        name = data_cfg.name
    else:
        name = (data_cfg if isinstance(data_cfg, DictConfig) else OmegaConf.create(data_cfg)).get("name")
    cls = dataset_class(name)
    return cls(cls.make_config(data_cfg), split)  # types, unknown keys, __post_init__ checks


__all__ = [
    "DATASETS", "CaptionedDataset", "CIFAR10Dataset", "CorruptData", "DataConfig", "DataNotFound",
    "FashionMNISTDataset", "MNISTDataset", "SPECIAL_TOKENS", "ShapesDataset", "build_dataset",
    "build_vocab", "dataset_class", "read_idx", "uint8_to_image", "words",
]
