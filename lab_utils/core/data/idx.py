"""``fashion_mnist`` and ``mnist``: 28 x 28 grey images stored in IDX files, read without torchvision.

An IDX file (LeCun's format, often gzipped) is a big-endian header then raw bytes:

    0x00 0x00 <dtype: 0x08 = uint8> <ndim>  | ndim x int32 sizes | prod(sizes) bytes

Files are looked for, in order, in ``data.root`` (flat, or torchvision's
``<root>/<Name>/raw/``), the genlab cache (when ``root`` is null), the ``system_dirs``
(Debian's ``dataset-fashion-mnist`` package installs ``/usr/share/datasets/fashion-mnist``),
and finally downloaded with torchvision when ``data.download=true``.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import numpy as np
import torch

from lab_utils.core.cache_folder import cache_folder
from lab_utils.core.data.base import ClassCaptionedDataset, CorruptData, DataConfig, find_or_download

IDX_UBYTE = 0x08  # the IDX dtype code of unsigned bytes (the only one these datasets use)


def read_idx(path: Path, ndim: int) -> torch.Tensor:
    """An IDX file (plain or .gz) -> uint8 tensor of its shape; :class:`CorruptData` names the file."""
    try:
        with open(path, "rb") as handle:
            gzipped = handle.read(2) == b"\x1f\x8b"  # the gzip magic number
        with (gzip.open(path, "rb") if gzipped else open(path, "rb")) as handle:
            raw = handle.read()
    except (OSError, EOFError) as err:  # truncated or damaged gzip stream
        raise CorruptData(f"{path}: cannot read the file ({type(err).__name__}: {err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise CorruptData(f"{path}: not an IDX file (the magic number must start with two zero bytes)")
    if raw[2] != IDX_UBYTE or raw[3] != ndim:
        raise CorruptData(f"{path}: expected uint8 data with {ndim} dimensions, "
                          f"the header says dtype 0x{raw[2]:02x} with {raw[3]} dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CorruptData(f"{path}: truncated header")
    shape = struct.unpack(f">{ndim}i", raw[4:header])  # big-endian int32 sizes
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise CorruptData(f"{path}: truncated or padded: the header promises {expected} bytes "
                          f"of shape {shape}, the file has {len(raw) - header}")
    array = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)
    return torch.from_numpy(array.copy())


def find_idx(folder: Path, stem: str) -> Optional[Path]:
    """``folder/stem`` or ``folder/stem.gz``, whichever exists (the plain file first)."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


class IDXDataset(ClassCaptionedDataset):
    """A 28 x 28 grey IDX dataset; subclasses name the torchvision class and the attribute."""

    channels = 1
    pad_to = 32  # 28 -> 32 with 2 background pixels on each side
    torchvision_name: ClassVar[str]  # the torchvision dataset class, also its raw/ folder name
    title: ClassVar[str]  # for messages: "Fashion-MNIST"
    install_hint: ClassVar[Optional[str]] = None  # a system package that provides the files

    def __init__(self, cfg: Any, split: str = "train"):
        super().__init__(cfg, split)
        prefix = "train" if split == "train" else "t10k"
        stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
        folder = self._locate(stems)
        images = read_idx(find_idx(folder, stems[0]), ndim=3)  # (N, 28, 28)
        labels = read_idx(find_idx(folder, stems[1]), ndim=1)  # (N,)
        if len(images) != len(labels):
            raise CorruptData(f"{folder}: {len(images)} images but {len(labels)} labels")
        num_classes = len(next(iter(self.attributes.values())))
        if len(labels) and int(labels.max()) >= num_classes:
            raise CorruptData(f"{folder}: label {int(labels.max())} out of range for {num_classes} classes")
        self.source = folder
        self._set_data(images.unsqueeze(1), labels.unsqueeze(1))  # (N, 1, 28, 28), (N, 1)

    def _locate(self, stems: tuple[str, str]) -> Path:
        cfg = self.cfg
        root = Path(cfg.root).expanduser() if cfg.root else cache_folder(self.name)
        dirs = [root, root / self.torchvision_name / "raw"] + [Path(d) for d in cfg.system_dirs]

        def download() -> None:
            import torchvision

            getattr(torchvision.datasets, self.torchvision_name)(
                str(root), train=self.split == "train", download=True)

        ways = [f"set data.root=/path/to/folder holding the IDX files (flat, or torchvision's "
                f"<root>/{self.torchvision_name}/raw/ layout)"]
        if self.install_hint:
            ways.append(self.install_hint)
        ways.append(f"set data.download=true to let torchvision download it into {root}")
        return find_or_download(
            f"{self.title} ({self.split} split)", dirs,
            has_files=lambda folder: all(find_idx(folder, stem) for stem in stems),
            download=download if cfg.download else None,
            ways=ways, wanted=" and ".join(f"{stem}[.gz]" for stem in stems),
        )


class FashionMNISTDataset(IDXDataset):
    """Zalando's Fashion-MNIST: 60k + 10k grey 28 x 28 photos of clothes in 10 classes."""

    name = "fashion_mnist"
    torchvision_name = "FashionMNIST"
    title = "Fashion-MNIST"
    install_hint = ("install the Debian package: sudo apt-get install dataset-fashion-mnist "
                    "(files in /usr/share/datasets/fashion-mnist/)")
    attributes = {"class": ["t-shirt/top", "trouser", "pullover", "dress", "coat",
                            "sandal", "shirt", "sneaker", "bag", "ankle boot"]}
    templates = (
        "a photo of a {name}",
        "a picture of a {name}",
        "a {name}",
        "a black and white photo of a {name}",
        "an image of a {name}",
        "a product photo of a {name}",
    )

    @dataclass
    class Config(DataConfig):
        name: str = "fashion_mnist"
        # folders searched after data.root (the Debian package's, by default)
        system_dirs: list[str] = field(default_factory=lambda: ["/usr/share/datasets/fashion-mnist"])


class MNISTDataset(IDXDataset):
    """LeCun's MNIST: 60k + 10k grey 28 x 28 handwritten digits."""

    name = "mnist"
    torchvision_name = "MNIST"
    title = "MNIST"
    attributes = {"digit": ["zero", "one", "two", "three", "four",
                            "five", "six", "seven", "eight", "nine"]}
    templates = (
        "a handwritten digit {name}",
        "the number {index}",
        "a handwritten {name}",
        "the digit {index}",
        "a {name}, written by hand",
        "a handwritten number {index}",
    )

    @dataclass
    class Config(DataConfig):
        name: str = "mnist"
        system_dirs: list[str] = field(default_factory=list)  # folders searched after data.root
