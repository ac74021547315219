"""Shared test set-up: a private dataset cache, the tests folder importable, and one thread."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
# The `genlab` command as a user types it: the console script pip installed beside this interpreter, which goes
# straight to lab_utils.commands.cli:main (`python -m genlab` first imports the notebook door, genlab/__init__.py,
# and with it torch: seconds for every refused input; tests/test_genlab_door.py runs that path).
GENLAB = [str(Path(sys.executable).with_name("genlab"))]
sys.path.insert(0, str(TESTS))  # `tiny_lab` (the harness's test model) is importable by tests and subprocesses


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "a", "small", "large", "red", "green", "blue", "circle", "square",
         "triangle", "at", "the", "top", "bottom", "left", "right", "center"]


def data_info(channels: int = 3, size: int = 16):
    """A small fake dataset description for the families' unit tests (no data behind it)."""
    from lab_utils.core.lab import DataInfo

    return DataInfo(name="fake", channels=channels, image_size=size, attributes={}, vocab=VOCAB,
                    prompts=["a red circle", "a small blue square at the top left"])


def fake_cifar10(root: Path) -> Path:
    """Write a fake CIFAR-10 folder under ``root`` (the dataset's ``data.root``): 5 x 16 train and 16 test random
    images, none of them mirror-symmetric (so a flip is always visible), with random labels; returns ``root``."""
    import pickle

    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ["test_batch"] + [f"data_batch_{k}" for k in range(1, 6)]:
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": rng.integers(0, 256, (16, 3072), dtype=np.uint8),
                         b"labels": [int(k) for k in rng.integers(0, 10, 16)]}, handle)
    return root


def cifar(root: Path, split: str = "train", **overrides):
    """The CIFAR-10 dataset of a (fake) folder ``root``, with data-config ``overrides``."""
    from lab_utils.core.data import build_dataset

    return build_dataset({"name": "cifar10", "root": str(root), **overrides}, split)


@pytest.fixture(scope="session", autouse=True)
def _one_thread_everywhere():
    """One torch thread in this process and in every process it starts (OMP_NUM_THREADS, which `subprocess_env`
    and a plain subprocess call pass on): the suite's models are tiny, and two threads on two cores that other work
    shares spend their time in OpenMP's barriers (on a busy machine tests/test_diffusion.py took 233 s with two, 49 s
    with one; its CPU time 128 s against 21 s). In-process and subprocess computations keep the same thread count,
    as they had before (both two). A test that needs another count says so (OMP_NUM_THREADS= in its env)."""
    import torch

    previous_env, previous = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
    if previous_env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = previous_env


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``): one thread avoids
    OpenMP's synchronisation cost (large on a busy machine). The session holds one thread already
    (``_one_thread_everywhere``); this keeps a module at one should a test before it have changed the count."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Generated datasets go to a cache private to this test session (subprocesses inherit it)."""
    previous = os.environ.get("GENLAB_CACHE")
    os.environ["GENLAB_CACHE"] = str(tmp_path_factory.mktemp("genlab_cache"))
    os.environ.setdefault("MPLBACKEND", "Agg")
    yield
    if previous is None:
        os.environ.pop("GENLAB_CACHE", None)
    else:
        os.environ["GENLAB_CACHE"] = previous


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a `genlab`/python subprocess: the tests folder on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")  # the session's count (_one_thread_everywhere)
    env.update(extra)
    return env
