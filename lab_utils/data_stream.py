"""The trainer's data: an endless, resumable stream of batches, sharded over the processes of a run.

Epoch ``e`` visits ``randperm(n)`` seeded by ``seed + e``, so the position in the stream (epoch and
batch) is all a checkpoint needs to continue the same order.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

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


class DataStream:
    """An endless, resumable stream of batches, sharded over the processes of a distributed run.

    Epoch ``e`` visits ``randperm(n)`` seeded by ``seed + e`` (``DistributedSampler``'s order), cut
    into global batches of ``batch_size * world_size``; process ``r`` takes the items ``r, r + W, ...``
    of each global batch, so the processes together see exactly the single-process batches. The
    position is counted in global batches, so a run resumes with another number of processes.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, device: torch.device, num_workers: int = 0,
                 rank: int = 0, world_size: int = 1, pin_memory: bool = True, channels_last: bool = False):
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
        self.epoch, self.position = 0, 0  # position = global batches already taken from this epoch
        self._batches: Iterator | None = None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch  # the last partial batch is dropped

    def _start_epoch(self) -> Iterator:
        sampler = DistributedSampler(self.dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True,
                                     seed=self.seed, drop_last=True)
        sampler.set_epoch(self.epoch)  # reshuffle: randperm seeded by seed + epoch
        mine = torch.tensor(list(sampler))[: self.batches_per_epoch * self.batch_size]  # this process's items
        batches = mine.view(-1, self.batch_size)[self.position:].tolist()  # (batches left, B)
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                            pin_memory=self.pin_memory, persistent_workers=False)
        return iter(loader)

    def __iter__(self) -> "DataStream":
        return self

    def __next__(self) -> dict[str, Any]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position, self._batches = self.epoch + 1, 0, None
        if self._batches is None:
            self._batches = self._start_epoch()
        batch = next(self._batches)
        self.position += 1
        return move_to(batch, self.device, self.channels_last)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self._batches = int(state["epoch"]), int(state["position"]), None
        saved = int(state.get("global_batch", self.global_batch))
        if saved != self.global_batch:  # per-process batches with another number of processes
            self.position = math.ceil(self.position * saved / self.global_batch)
            log.warning("the checkpoint's global batch was %d, now %d: continuing at the first batch of this "
                        "epoch not yet fully seen (some items of the epoch are skipped)", saved, self.global_batch)
