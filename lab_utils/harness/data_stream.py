"""The trainer's data: an endless, resumable stream of batches, sharded over the processes of a run.

Epoch ``e`` visits ``randperm(n)`` seeded by ``seed + e``, so the position in the stream (epoch and
batch) is all a checkpoint needs to continue the same order. The batches are cut one of two ways, the same
batches either way: the same items, captions, labels and flips, and on a CPU the same image bits (on a GPU
the conversion to floats, and a resize, may round differently from the CPU's in the last bit):

- *the loader* (the default): one ``DataLoader`` for the whole run, over an endless batch sampler that yields
  the stream's batches epoch after epoch, so its ``trainer.num_workers`` worker processes start once (and once
  more on a resume), never at an epoch boundary;
- *on the device* (``trainer.data_on_device``): an in-memory dataset's uint8 images and labels are copied to
  the device once (CIFAR-10's train split: 150 MB); each batch is cut there by index, the loader's indices, and
  converted there (uint8 -> [-1, 1], padding, resizing, flips). Captions stay strings on the host. No worker
  process, no host-to-device copy of images, no host sync inside an epoch.

Random flips (``dataset.random_flip``: CIFAR-10's train split) mirror item ``i`` in epoch ``e`` when
:func:`flip_coins` says so. The coin is a hash of (seed, epoch, item), not a draw from an RNG: an RNG's state
would depend on how the loader was started (a resumed run, another number of workers, the run's own draws),
a hash depends on the position in the stream only, and gives the same bits on the host and on any device.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate

from lab_utils.core.data.base import CaptionedDataset, uint8_to_images

log = logging.getLogger("genlab.train")


def move_to(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        return batch.contiguous(memory_format=torch.channels_last) if channels_last and batch.dim() == 4 else batch
    if isinstance(batch, dict):
        return {key: move_to(value, device, channels_last) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(move_to(value, device, channels_last) for value in batch)
    return batch


# --- random flips: a coin per (seed, epoch, item) -------------------------------------------------------------
def mix32(x: Any) -> Any:
    """A 32-bit integer hash (Wellons' "lowbias32") of a Python int or an int64 tensor of values in [0, 2^32).

    Products are taken 16 bits of the factor at a time, so no int64 product reaches 2^63: the same bits on the
    host and on any device."""
    x = x ^ (x >> 16)
    x = _times_mod_2_32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _times_mod_2_32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _times_mod_2_32(x: Any, factor: int) -> Any:
    """x * factor mod 2^32 for 0 <= x < 2^32: x * low + (x * high mod 2^16) * 2^16, each product < 2^48."""
    low, high = factor & 0xFFFF, factor >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & 0xFFFFFFFF


def flip_coins(seed: int, epoch: int, index: torch.Tensor) -> torch.Tensor:
    """(B,) item indices -> (B,) bool on their device: whether each item is mirrored in ``epoch`` of a stream
    seeded ``seed`` (a fair coin per (seed, epoch, item): the top bit of a hash)."""
    key = mix32(mix32(seed & 0xFFFFFFFF) ^ (epoch & 0xFFFFFFFF))  # one key per (seed, epoch): Python ints
    return (mix32((index.long() & 0xFFFFFFFF) ^ key) >> 31) == 1  # (B,)


def mirror(images: torch.Tensor, coins: torch.Tensor) -> torch.Tensor:
    """(B, C, S, S) images with those whose (B,) coin is true mirrored left-right (the width axis)."""
    return torch.where(coins[:, None, None, None], images.flip(-1), images)


# --- the loader: one DataLoader for the whole run ------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class EpochOrder:
    """Which items each batch of an epoch takes on process ``rank`` of ``world_size``: ``DistributedSampler``'s
    order, ``randperm(n)`` seeded by ``seed + epoch``, item ``r, r + W, ...`` of each global batch of ``B * W``."""

    dataset: Dataset
    batch_size: int  # B, per process
    seed: int
    rank: int = 0
    world_size: int = 1

    def __call__(self, epoch: int) -> torch.Tensor:
        """(batches, B) long on the host: this process's items of each batch of ``epoch``."""
        sampler = DistributedSampler(self.dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                     seed=self.seed, drop_last=True)
        sampler.set_epoch(epoch)  # reshuffle: randperm seeded by seed + epoch
        batches = len(self.dataset) // (self.batch_size * self.world_size)  # the last partial batch is dropped
        mine = torch.tensor(list(sampler))[: batches * self.batch_size]  # this process's items
        return mine.view(batches, self.batch_size)  # (batches, B)


class StreamSampler:
    """An endless batch sampler: ``(epoch, indices)`` for each of this process's batches from (epoch, position)
    on, epoch after epoch (``DataLoader``'s ``batch_sampler``; it runs in the main process). It holds the order,
    not the stream: no reference cycle keeps the loader's workers alive after the stream is dropped."""

    def __init__(self, order: EpochOrder, epoch: int, position: int):
        self.order, self.epoch, self.position = order, epoch, position

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        epoch, position = self.epoch, self.position
        while True:
            for indices in self.order(epoch)[position:].tolist():  # (batches left, B)
                yield epoch, indices
            epoch, position = epoch + 1, 0


class StreamItems(Dataset):
    """The dataset as the stream's loader reads it: a key ``(epoch, indices)`` -> the collated batch of those
    items, mirrored by :func:`flip_coins` when the dataset has ``random_flip`` (in the worker process)."""

    def __init__(self, dataset: Dataset, seed: int, random_flip: bool):
        self.dataset, self.seed, self.random_flip = dataset, seed, random_flip

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, list[int]]) -> dict[str, Any]:
        return self.__getitems__(key)

    def __getitems__(self, key: tuple[int, list[int]]) -> dict[str, Any]:
        epoch, indices = key
        fetch = getattr(self.dataset, "__getitems__", None)
        batch = default_collate(fetch(indices) if fetch else [self.dataset[i] for i in indices])
        if self.random_flip:
            batch["image"] = mirror(batch["image"], flip_coins(self.seed, epoch, torch.tensor(indices)))
        return batch


def already_collated(batch: Any) -> Any:
    """The loader's ``collate_fn``: :class:`StreamItems` hands over whole batches."""
    return batch


# --- on the device: the whole dataset copied once -------------------------------------------------------------
class ResidentData:
    """A :class:`CaptionedDataset`'s items on ``device``: uint8 images (N, C, H, W) and labels (N, A) copied once;
    the captions, strings, on the host (each written once here, as ``dataset.caption(i)`` writes it)."""

    def __init__(self, dataset: CaptionedDataset, device: torch.device):
        self.pixels = dataset.pixels.to(device)  # (N, C, H, W) uint8
        self.labels = dataset.labels.to(device)  # (N, A) long
        self.captions = [dataset.caption(i) for i in range(len(dataset))]
        self.pad_to, self.image_size = dataset.pad_to, dataset.image_size

    @staticmethod
    def refusal(dataset: Dataset, device: torch.device) -> Optional[str]:
        """Why ``dataset`` cannot live on ``device`` (None: it can)."""
        if not isinstance(dataset, CaptionedDataset) or type(dataset).__getitem__ is not CaptionedDataset.__getitem__:
            return (f"{type(dataset).__name__} does not build its items from one in-memory uint8 tensor "
                    "(lab_utils.core.data.CaptionedDataset)")
        size = dataset.pixels.nbytes + dataset.labels.nbytes
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if size > free // 4:  # leave the rest to training
                return f"its {size / 2**20:.0f} MiB would take more than a quarter of the GPU's free memory"
        return None

    def batches(self, order: EpochOrder, epoch: int, position: int, random_flip: bool,
                channels_last: bool) -> Iterator[dict[str, Any]]:
        """The batches from (epoch, position) on, cut on the device in the loader's ``order``. One copy to the
        device per epoch (the epoch's order), none per batch."""
        device = self.pixels.device
        while True:
            host_order = order(epoch)  # (batches, B) on the host
            on_device = host_order.pin_memory() if device.type == "cuda" else host_order  # pinned: no wait for the GPU
            on_device = on_device.to(device, non_blocking=True)
            for row, host_index in enumerate(host_order.tolist()[position:], start=position):
                index = on_device[row]  # (B,) on the device
                batch = self.batch(index, host_index, flip_coins(order.seed, epoch, index) if random_flip else None)
                if channels_last:
                    batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
                yield batch
            epoch, position = epoch + 1, 0

    def batch(self, index: torch.Tensor, host_index: Sequence[int], coins: Optional[torch.Tensor]) -> dict[str, Any]:
        """The batch of items ``index`` ((B,) on the device; ``host_index`` the same on the host, for the
        captions), mirrored where ``coins`` ((B,) bool, or None) says, as the loader's collated batch."""
        images = uint8_to_images(self.pixels.index_select(0, index), self.pad_to, self.image_size)  # (B, C, S, S)
        if coins is not None:
            images = mirror(images, coins)
        return {"image": images, "caption": [self.captions[i] for i in host_index],
                "labels": self.labels.index_select(0, index)}  # (B, A)


class DataStream:
    """An endless, resumable stream of batches, sharded over the processes of a distributed run.

    Epoch ``e`` visits ``randperm(n)`` seeded by ``seed + e`` (``DistributedSampler``'s order), cut
    into global batches of ``batch_size * world_size``; process ``r`` takes the items ``r, r + W, ...``
    of each global batch, so the processes together see exactly the single-process batches. The
    position is counted in global batches, so a run resumes with another number of processes.

    ``on_device=True`` (``trainer.data_on_device``) cuts the batches on ``device`` from a copy of the whole
    dataset (see the module docstring). A dataset that cannot be copied there (not a :class:`CaptionedDataset`
    in memory, or too large for the GPU's free memory) falls back to the loader with a logged warning saying
    why: the batches are the same either way, only the speed differs.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, device: torch.device, num_workers: int = 0,
                 rank: int = 0, world_size: int = 1, pin_memory: bool = True, channels_last: bool = False,
                 on_device: bool = False):
        self.global_batch = batch_size * world_size
        if len(dataset) < self.global_batch:
            raise ValueError(
                f"the training set has {len(dataset)} items, fewer than one global batch of {self.global_batch} "
                f"({world_size} process(es) x {batch_size}); lower trainer.batch_size or use more data (data.subset)"
            )
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.device, self.num_workers, self.rank, self.world_size = device, num_workers, rank, world_size
        self.pin_memory = pin_memory and device.type == "cuda"
        self.channels_last = channels_last
        self.order = EpochOrder(dataset, batch_size, seed, rank, world_size)
        self.random_flip = bool(getattr(dataset, "random_flip", False))
        self.resident: Optional[ResidentData] = None
        if on_device:
            refusal = ResidentData.refusal(dataset, device)
            if refusal is None:
                self.resident = ResidentData(dataset, device)
            else:
                log.warning("trainer.data_on_device: %s; batches come from the DataLoader (trainer.num_workers=%d) "
                            "instead", refusal, num_workers)
        self.epoch, self.position = 0, 0  # position = global batches already taken from this epoch
        self._batches: Iterator | None = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch  # the last partial batch is dropped

    def _loader_batches(self) -> Iterator[dict[str, Any]]:
        """Batches from (epoch, position) on, from one DataLoader whose workers live as long as the stream.

        The loader draws its workers' seeds from a generator of its own: a loader started with torch's global RNG
        would take a draw from it, and a resumed run (which starts one where the uninterrupted run did not) would
        train on other noise (the stream's own draw is at epoch starts, in ``__next__``). The generator returned holds the loader, not the stream: dropping the stream (or a
        resume's ``load_state_dict``) frees it at once, and the workers stop then. (A loader's iterator freed as
        part of a reference cycle by the garbage collector waits ~5 s per worker: its queues are closed first.)"""
        loader = DataLoader(StreamItems(self.dataset, self.seed, self.random_flip),
                            batch_sampler=StreamSampler(self.order, self.epoch, self.position),
                            collate_fn=already_collated, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            generator=torch.Generator().manual_seed(self.seed))  # not torch's global RNG (below)
        device, channels_last = self.device, self.channels_last
        return (move_to(batch, device, channels_last) for batch in loader)

    def __iter__(self) -> "DataStream":
        return self

    def __next__(self) -> dict[str, Any]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        if self.position == 0:
            # One draw from torch's global RNG at each epoch's start, whichever way the batches are cut: what the
            # DataLoader started at every epoch by earlier versions took for its workers' seeds. It keeps runs on
            # the noise they trained on before (the zoo, stored notebook outputs, tests' pinned numbers); taken at
            # epoch starts only, so a run resumed mid-epoch draws where the uninterrupted run did.
            torch.empty((), dtype=torch.int64).random_()
        if self._batches is None:  # the first batch, or the first after load_state_dict
            if self.resident is not None:
                self._batches = self.resident.batches(self.order, self.epoch, self.position, self.random_flip,
                                                      self.channels_last)
            else:
                self._batches = self._loader_batches()
        batch = next(self._batches)
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._batches = int(state["epoch"]), int(state["position"]), None
        saved = int(state.get("global_batch", self.global_batch))
        if saved != self.global_batch:  # per-process batches with another number of processes
            self.position = math.ceil(self.position * saved / self.global_batch)
            log.warning("the checkpoint's global batch was %d, now %d: continuing at the first batch of this "
                        "epoch not yet fully seen (some items of the epoch are skipped)", saved, self.global_batch)
