"""``cifar10``: 60k colour 32 x 32 photos in 10 classes, read from the python-pickle batches.

torchvision's layout is ``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``.
Each batch is a pickled dict with ``data``, a (10000, 3072) uint8 array whose rows are

    [R plane (32 x 32, row-major) | G plane | B plane]     -> reshape to (N, 3, 32, 32)

and ``labels``, a list of class ids. torchvision's own ``CIFAR10`` unpickles the files with
plain ``pickle`` (which runs any code a crafted file names), so it is only used here to download
(``data.download=true``); genlab reads them with :class:`BatchUnpickler`, which builds only the
few harmless objects a CIFAR batch holds (dicts, lists, bytes, numpy arrays) and refuses every
other global, and checks torchvision's published MD5 sums (a mismatch is reported, not fatal:
a subset or a re-pickled copy is still readable, safely).
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lab_utils.core.cache_folder import cache_folder
from lab_utils.core.data.base import ClassCaptionedDataset, CorruptData, DataConfig, find_or_download

log = logging.getLogger("genlab.data")

BATCH_FOLDER = "cifar-10-batches-py"  # torchvision's folder name inside root
# torchvision.datasets.CIFAR10's published MD5 sums of the standard files.
STANDARD_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}


class BatchUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and builtin containers only.

    A pickle names the callables that rebuild its objects (``GLOBAL module name``); plain
    ``pickle.load`` imports and calls whatever is named, so ``os.system`` in a crafted file runs.
    A CIFAR batch (pickled by Python 2 or 3, protocol <= 2) names just these:
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # ndarray.__reduce__ (numpy < 2)
        ("numpy._core.multiarray", "_reconstruct"),  # the same in numpy >= 2
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes pickled by Python 3 at protocol 2: encode(str, "latin1")
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR batch never holds "
                                         "(refused: unpickling it could run code)")
        return super().find_class(module, name)


def _md5(raw: bytes) -> str:
    return hashlib.md5(raw, usedforsecurity=False).hexdigest()


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR batch -> (N, 3, 32, 32) uint8 images and (N,) int64 labels.

    The files were written by Python 2, so keys are bytes (``encoding="bytes"``); batches
    pickled by Python 3 (with str keys) are accepted too. Read with :class:`BatchUnpickler`:
    a file that names anything but numpy arrays and builtins is refused, and nothing in it runs.
    """
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise CorruptData(f"{path}: cannot be read ({err.strerror})") from None
    expected = STANDARD_MD5.get(path.name)
    if expected is not None and _md5(raw) != expected:
        log.warning("%s is not torchvision's published file (MD5 differs): reading it as data, safely", path)
    try:
        batch = BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
        if not isinstance(batch, dict):
            raise TypeError(f"it holds a {type(batch).__name__}, not a dict")
        batch = {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch.get("labels", batch.get("fine_labels")), dtype=np.int64)
    except pickle.UnpicklingError as err:
        raise CorruptData(f"{path}: not a CIFAR batch: {err}") from None
    except (EOFError, AttributeError, KeyError, TypeError, ValueError, IndexError) as err:
        raise CorruptData(f"{path}: not a CIFAR batch ({type(err).__name__}: {err})") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise CorruptData(f"{path}: expected data (N, 3072) and N labels, "
                          f"got data {data.shape} and {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), labels  # (N, 3072) -> (N, C, H, W): R, G, B planes


class CIFAR10Dataset(ClassCaptionedDataset):
    """Krizhevsky's CIFAR-10: 50k train + 10k test colour 32 x 32 photos."""

    name = "cifar10"
    channels = 3
    attributes = {"class": ["airplane", "automobile", "bird", "cat", "deer",
                            "dog", "frog", "horse", "ship", "truck"]}
    templates = (
        "a photo of a {name}",
        "a picture of a {name}",
        "a {name}",
        "a small photo of a {name}",
        "a blurry photo of a {name}",
        "an image of a {name}",
    )
    num_train_batches = 5  # data_batch_1 .. data_batch_5

    @dataclass
    class Config(DataConfig):
        name: str = "cifar10"
        # The trainer's stream mirrors each training image left-right with probability 1/2 (a coin per run seed,
        # epoch and item; Ho et al. 2020 train on CIFAR-10 with random flips): the classes have no left/right, so
        # it doubles the data for free. False (an old checkpoint's config has no such key) keeps the unflipped
        # stream; conf/data/cifar10.yaml turns it on.
        random_flip: bool = False

    def __init__(self, cfg: Any, split: str = "train"):
        super().__init__(cfg, split)
        cfg = self.cfg  # the checked dataclass
        files = ([f"data_batch_{k}" for k in range(1, self.num_train_batches + 1)]
                 if split == "train" else ["test_batch"])
        root = Path(cfg.root).expanduser() if cfg.root else cache_folder(self.name)

        def download() -> None:
            import torchvision

            torchvision.datasets.CIFAR10(str(root), train=split == "train", download=True)

        folder = find_or_download(
            f"CIFAR-10 ({split} split)", [root / BATCH_FOLDER, root],
            has_files=lambda folder: all((folder / name).is_file() for name in files),
            download=download if cfg.download else None,
            ways=[f"set data.root=/path/to/folder holding {BATCH_FOLDER}/ (torchvision's layout)",
                  f"set data.download=true to let torchvision download it into {root}"],
            wanted=", ".join(files),
        )
        batches = [read_batch(folder / name) for name in files]
        images = torch.from_numpy(np.concatenate([images for images, _ in batches]))  # (N, 3, 32, 32)
        labels = torch.from_numpy(np.concatenate([labels for _, labels in batches]))  # (N,)
        num_classes = len(self.attributes["class"])
        if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < num_classes):
            raise CorruptData(f"{folder}: labels outside 0..{num_classes - 1}")
        self.source = folder
        self._set_data(images, labels.unsqueeze(1))  # (N, 3, 32, 32), (N, 1)
