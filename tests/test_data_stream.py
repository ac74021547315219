"""The trainer's data stream: the seeded epoch order, one set of loader workers for the whole run, the dataset on
the device (the loader's batches bit for bit, no host sync inside an epoch), and random flips seeded per
(seed, epoch, item)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import cifar, fake_cifar10
from lab_utils.core.config import compose
from lab_utils.core.data import build_dataset
from lab_utils.core.data.base import ClassCaptionedDataset, DataConfig
from lab_utils.harness import data_stream
from lab_utils.harness.data_stream import DataStream, flip_coins, mix32

CPU = torch.device("cpu")


class Numbers(torch.utils.data.Dataset):
    """Item ``i`` is its own index, and the id of the process that fetched it (a loader worker's, or ours)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": torch.tensor([index]), "pid": torch.tensor([os.getpid()])}


class PaddedDigits(ClassCaptionedDataset):
    """A 28 x 28 grey dataset padded to 32 (as MNIST): ``n`` random images, labels ``i mod 10``."""

    name, channels, pad_to = "padded_digits", 1, 32
    attributes = {"digit": [str(k) for k in range(10)]}
    templates = ("the number {index}", "a handwritten {name}")

    def __init__(self, cfg, split: str = "train", n: int = 40):
        super().__init__(cfg, split)
        pixels = torch.randint(0, 256, (n, 1, 28, 28), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
        self._set_data(pixels, (torch.arange(n) % 10)[:, None])


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    return fake_cifar10(tmp_path_factory.mktemp("cifar"))


def take(stream: DataStream, count: int) -> list[dict]:
    return [next(stream) for _ in range(count)]


def assert_same_batches(first: list[dict], second: list[dict]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert torch.equal(a["image"], b["image"]), "images differ"  # bit for bit
        assert torch.equal(a["labels"], b["labels"]) and list(a["caption"]) == list(b["caption"])


# --- the order: randperm seeded by seed + epoch ------------------------------------------------------------
def test_the_loader_visits_randperm_of_seed_plus_epoch_across_epochs():
    stream = DataStream(Numbers(26), batch_size=4, seed=11, device=CPU)  # 6 batches per epoch, 2 items dropped
    seen = [next(stream)["image"].flatten().tolist() for _ in range(15)]  # into the third epoch
    expected = []
    for epoch in range(3):
        order = torch.randperm(26, generator=torch.Generator().manual_seed(11 + epoch))[:24].view(6, 4)
        expected += order.tolist()
    assert seen == expected[:15] and stream.state_dict() == {"epoch": 2, "position": 3, "global_batch": 4}


def test_the_loaders_workers_start_once_for_the_whole_run_and_once_more_on_a_resume(monkeypatch):
    loaders = []

    class CountedLoader(DataLoader):
        def __init__(self, *args, **kwargs):
            loaders.append(kwargs["num_workers"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(data_stream, "DataLoader", CountedLoader)
    stream = DataStream(Numbers(24), batch_size=4, seed=0, device=CPU, num_workers=2)
    batches = take(stream, 20)  # 6 batches per epoch: three epoch boundaries
    pids = {int(pid) for batch in batches for pid in batch["pid"]}
    assert loaders == [2] and len(pids) == 2 and os.getpid() not in pids  # the same two workers throughout
    plain = take(DataStream(Numbers(24), batch_size=4, seed=0, device=CPU), 20)  # no workers: the same batches
    assert [b["image"].tolist() for b in batches] == [b["image"].tolist() for b in plain]
    resumed = DataStream(Numbers(24), batch_size=4, seed=0, device=CPU, num_workers=2)
    resumed.load_state_dict({"epoch": 1, "position": 6, "global_batch": 4})  # a checkpoint at an epoch's end
    assert [b["image"].tolist() for b in take(resumed, 8)] == [b["image"].tolist() for b in plain[12:]]
    assert loaders == [2, 0, 2] and resumed.state_dict() == {"epoch": 3, "position": 2, "global_batch": 4}


def test_the_stream_draws_once_from_torchs_rng_at_each_epoch_start_and_not_on_a_resume(cifar_root):
    """One draw per epoch start (as the per-epoch DataLoader of earlier versions took: the runs' numbers stay as
    they were), whichever way the batches are cut; none when a loader starts on a resume, or the resumed run
    would train on other noise than the uninterrupted run (tests/test_trainer.py's kill-and-resume test)."""
    def state_after(draws: int) -> torch.Tensor:
        torch.manual_seed(0)
        for _ in range(draws):
            torch.empty((), dtype=torch.int64).random_()
        return torch.get_rng_state()

    train = cifar(cifar_root, random_flip=True)
    for kwargs in ({"num_workers": 0}, {"num_workers": 2}, {"on_device": True}):
        torch.manual_seed(0)
        stream = DataStream(train, batch_size=20, seed=0, device=CPU, **kwargs)  # 4 batches per epoch
        take(stream, 5)  # epochs 0 and 1 started
        assert torch.equal(torch.get_rng_state(), state_after(2)), kwargs
        resumed = DataStream(train, batch_size=20, seed=0, device=CPU, **kwargs)
        resumed.load_state_dict({"epoch": 1, "position": 1, "global_batch": 20})
        take(resumed, 3)  # the rest of epoch 1: no epoch start
        assert torch.equal(torch.get_rng_state(), state_after(2)), kwargs
        take(resumed, 1)  # epoch 2
        assert torch.equal(torch.get_rng_state(), state_after(3)), kwargs


# --- random flips -------------------------------------------------------------------------------------------
def test_flip_coins_are_a_fair_seeded_hash_of_seed_epoch_and_item():
    index = torch.arange(20000)
    coins = flip_coins(3, 7, index)
    assert coins.dtype == torch.bool and abs(coins.float().mean().item() - 0.5) < 0.015
    assert torch.equal(coins, flip_coins(3, 7, index.flip(0)).flip(0))  # a function of the item, not its place
    for other in (flip_coins(3, 8, index), flip_coins(4, 7, index), coins.roll(1)):  # next epoch, seed, item
        assert abs((coins == other).float().mean().item() - 0.5) < 0.015  # unrelated coins agree half the time
    # mix32 with int64 products that never overflow equals lowbias32 in wrapping uint32 arithmetic
    x = np.random.default_rng(0).integers(0, 2**32, 1000, dtype=np.uint64).astype(np.uint32)
    y = x ^ (x >> np.uint32(16))
    y = y * np.uint32(0x7FEB352D)
    y = y ^ (y >> np.uint32(15))
    y = y * np.uint32(0x846CA68B)
    y = y ^ (y >> np.uint32(16))
    assert mix32(torch.from_numpy(x.astype(np.int64))).tolist() == y.astype(np.int64).tolist()
    assert mix32(int(x[0])) == int(y[0])  # the same on Python ints (the per-epoch key)


def test_flips_mirror_about_half_of_cifars_training_items_the_same_way_for_a_seed_whatever_the_workers(cifar_root):
    train = cifar(cifar_root, random_flip=True)
    runs = [take(DataStream(train, batch_size=20, seed=0, device=CPU, num_workers=workers), 6)
            for workers in (0, 2, 0)]  # 4 batches per epoch: into the second epoch
    assert_same_batches(runs[0], runs[1])
    assert_same_batches(runs[0], runs[2])
    order = torch.cat([torch.randperm(80, generator=torch.Generator().manual_seed(epoch)) for epoch in (0, 1)])
    plain = torch.stack([train[i]["image"] for i in order[:120].tolist()])  # (120, C, S, S): dataset[i], unflipped
    images = torch.cat([batch["image"] for batch in runs[0]])
    expected = torch.cat([flip_coins(0, 0, order[:80]), flip_coins(0, 1, order[80:120])])
    assert torch.equal(images, torch.where(expected[:, None, None, None], plain.flip(-1), plain))
    assert 40 <= int(expected.sum()) <= 80  # ~ Binomial(120, 1/2): mean 60, sd 5.5
    other_seed = torch.cat([batch["image"] for batch in take(DataStream(train, 20, seed=1, device=CPU), 1)])
    assert not torch.equal(other_seed, images[:20])
    unflipped = cifar(cifar_root)  # the schema's default: no flips
    batch = next(DataStream(unflipped, batch_size=80, seed=0, device=CPU))
    assert torch.equal(batch["image"], torch.stack([unflipped[i]["image"] for i in order[:80].tolist()]))


def test_items_and_evaluations_real_images_are_never_flipped(cifar_root):
    from labs.evaluator import quantize, real_images

    train = cifar(cifar_root, random_flip=True)
    assert train.random_flip and not cifar(cifar_root, "test", random_flip=True).random_flip  # train split only
    stored = torch.stack([train[i]["image"] for i in range(80)])  # (80, C, S, S)
    assert torch.equal(stored, train.pixels.float() / 127.5 - 1)  # dataset[i] is the item as stored
    assert torch.equal(real_images(train, range(80)), quantize(stored))
    assert torch.equal(next(iter(DataLoader(train, batch_size=80)))["image"], stored)  # a loader of your own


# --- the dataset on the device --------------------------------------------------------------------------------
def datasets(tmp_path: Path, cifar_root: Path) -> dict[str, object]:
    return {
        "shapes": build_dataset({"name": "shapes", "num_train": 50, "num_test": 8, "cache_dir": str(tmp_path)},
                                "train"),
        "cifar10 flipped, resized": cifar(cifar_root, random_flip=True, image_size=24),
        "padded digits": PaddedDigits(DataConfig(name="padded_digits")),
    }


@pytest.mark.parametrize("name", ["shapes", "cifar10 flipped, resized", "padded digits"])
def test_the_on_device_stream_yields_the_loaders_batches_and_resumes_the_same(name, tmp_path, cifar_root):
    dataset = datasets(tmp_path, cifar_root)[name]
    def stream(on_device: bool, **kwargs) -> DataStream:
        return DataStream(dataset, batch_size=kwargs.pop("batch_size", 8), seed=4, device=CPU, on_device=on_device,
                          **kwargs)

    loader, resident = stream(False), stream(True)
    assert loader.resident is None and resident.resident is not None
    batches_per_epoch = len(dataset) // 8
    expected = take(loader, batches_per_epoch + 3)  # across an epoch boundary
    assert_same_batches(take(resident, batches_per_epoch - 2), expected[: batches_per_epoch - 2])
    state = resident.state_dict()  # mid-epoch
    assert_same_batches(take(resident, 5), expected[batches_per_epoch - 2:])
    for on_device in (True, False):  # a resume gives the same batches, whichever way it cuts them
        again = stream(on_device)
        again.load_state_dict(state)
        assert_same_batches(take(again, 5), expected[batches_per_epoch - 2:])
    # several processes: each rank's shard, cut on the device, is the loader's shard of that rank
    shards = [(stream(False, batch_size=4, rank=r, world_size=2), stream(True, batch_size=4, rank=r, world_size=2))
              for r in range(2)]
    for by_loader, on_device in shards:
        assert_same_batches(take(on_device, batches_per_epoch + 1), take(by_loader, batches_per_epoch + 1))


def test_the_on_device_stream_makes_no_host_sync_inside_an_epoch(cifar_root, monkeypatch):
    from test_gpu_path import HostSync, no_host_sync  # the emulated GPU of tests/test_gpu_path.py

    resident = DataStream(cifar(cifar_root, random_flip=True), batch_size=8, seed=0, device=CPU, on_device=True,
                          channels_last=True)
    next(resident)  # the epoch's start: one non-blocking copy of the epoch's order
    with no_host_sync(monkeypatch):
        batches = take(resident, 8)  # flips, conversion and captions with no wait on the device
    assert batches[-1]["image"].is_contiguous(memory_format=torch.channels_last)
    with no_host_sync(monkeypatch), pytest.raises(HostSync):  # and the guard is on: reading a batch is a sync
        batches[0]["image"].sum().item()


def test_a_dataset_not_in_memory_falls_back_to_the_loader_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="genlab.train"):
        stream = DataStream(Numbers(12), batch_size=4, seed=0, device=CPU, on_device=True)
    assert stream.resident is None
    (record,) = caplog.records
    message = record.getMessage()
    assert "\n" not in message and message.startswith("trainer.data_on_device: Numbers does not build its items")
    assert "batches come from the DataLoader" in message
    assert next(stream)["image"].flatten().tolist() == torch.randperm(12, generator=torch.Generator().manual_seed(0))[
        :4].tolist()

    class Augmented(PaddedDigits):  # items that are not the stored pixels: the device could not cut them
        def __getitem__(self, index):
            return {**super().__getitem__(index), "image": torch.zeros(1, 32, 32)}

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="genlab.train"):
        assert DataStream(Augmented(DataConfig(name="padded_digits")), 4, 0, CPU, on_device=True).resident is None
    assert "Augmented does not build its items" in caplog.text


# --- the trainer's option ---------------------------------------------------------------------------------------
def test_trainer_data_on_device_is_off_by_default_on_in_the_gpu_preset_and_checked():
    assert compose(["model=ddpm", "data=shapes"]).trainer.data_on_device is False
    assert compose(["model=ddpm", "data=cifar10", "preset=gpu"]).trainer.data_on_device is True
    with pytest.raises(Exception, match="Error merging override trainer.data_on_device=sometimes"):
        compose(["model=ddpm", "data=shapes", "trainer.data_on_device=sometimes"])  # the CLI prints it in one line


def test_the_trainer_builds_its_stream_on_the_device_when_asked(tmp_path):
    from lab_utils.core.registry import build_lab
    from lab_utils.harness.run import trainer_settings
    from lab_utils.harness.trainer import Trainer

    for on_device in (False, True):
        cfg = compose(["model=vae", "data=shapes", "preset=smoke", "data.subset=32", "trainer.batch_size=4",
                       f"trainer.data_on_device={on_device}"])
        train_set = build_dataset(cfg.data, "train")
        info = train_set.data_info()
        trainer = Trainer(cfg, trainer_settings(cfg), tmp_path / str(on_device), build_lab(cfg, info), train_set, info,
                          CPU)
        assert (trainer.stream.resident is not None) is on_device


def test_data_on_device_is_left_out_of_the_settings_key_so_the_shipped_evaluator_still_matches():
    import json

    from conftest import REPO
    from lab_utils.commands.evaluation.cache import evaluator_config
    from lab_utils.harness.cached_run import run_key

    shipped = json.loads((REPO / "labs" / "evaluator" / "pretrained" / "manifest.json").read_text())
    cfg = evaluator_config({"name": "shapes"}, preset="cpu")  # what `make pretrained` ships
    on_device = evaluator_config({"name": "shapes"}, ["trainer.data_on_device=true"], preset="cpu")
    assert run_key(on_device) == run_key(cfg) == shipped["models"]["evaluator-shapes"]["key"]
