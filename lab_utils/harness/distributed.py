"""Data-parallel training on PyTorch's own engine: ``torchrun`` + ``torch.distributed`` + DDP.

``torchrun --nproc_per_node=N -m genlab train ...`` starts N copies of the command with
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set;
:func:`setup` reads them and joins the process group (NCCL on CUDA, gloo on CPU). Everything
else the harness needs from ``torch.distributed`` goes through the small helpers here, which are
no-ops in a single process, so the trainer reads the same either way.

Shutting down: a gloo job that reached ``destroy_process_group()`` while its DDP module was
still alive aborted ("terminate called without an active exception") in about 1 run of 5 on
a 2-core machine; dropping the DDP module first and meeting at a ``barrier()`` gave 0 in 10.
:func:`teardown` does exactly that, and the trainer drops its DDP module before calling it.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

log = logging.getLogger("genlab.distributed")

ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0  # this process among all processes
    local_rank: int = 0  # this process on its node (its GPU index)
    world_size: int = 1  # number of processes

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """What ``torchrun`` (or any launcher setting the same variables) says about this process."""
    if "WORLD_SIZE" not in os.environ:
        return DistInfo()
    try:
        return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                        int(os.environ["WORLD_SIZE"]))
    except ValueError:
        raise ValueError(f"cannot read the launcher's environment {[(k, os.environ.get(k)) for k in ENV_KEYS]}; "
                         "start distributed runs with torchrun") from None


def setup(device_name: str = "auto", backend: str = "auto", timeout_minutes: float = 30.0) -> tuple[DistInfo, bool]:
    """Join the process group torchrun describes (if any). Returns the info and whether this call
    started the group (then the caller owns :func:`teardown`)."""
    info = env_info()
    if not info.enabled:
        return info, False
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), info.local_rank, dist.get_world_size()), False
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda:")
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        if info.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={info.local_rank} but this node has {torch.cuda.device_count()} GPUs; "
                             "use --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    log.info("process %d of %d joined the %s process group", info.rank, info.world_size, backend)
    return info, True


def teardown(clean: bool = True) -> None:
    """Leave the process group: meet the other processes first after a clean finish (see the module doc)."""
    if not dist.is_initialized():
        return
    gc.collect()  # the caller dropped its DDP module; make sure its reducer is gone before the group is
    if clean:
        dist.barrier()
    dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over all processes (itself in a single process)."""
    if not active():
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor / dist.get_world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process (pickled; fine for configs, paths and checkpoints)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order, on every process."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's boolean on every process (a host-device sync on CUDA: use sparingly)."""
    if not active():
        return flag
    value = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())


def in_turn(fn: Callable[[], Any], info: DistInfo) -> Any:
    """``fn()`` on every process, in three turns with a barrier after each: rank 0, then the first process of
    every other node, then the rest. Whatever ``fn`` writes to disk (a download, a dataset cache) is written
    once per node (once in all when the nodes share the folder), never by several processes at once."""
    if not info.enabled:
        return fn()
    mine = 0 if info.rank == 0 else 1 if info.local_rank == 0 else 2
    result = None
    for turn in range(3):
        if turn == mine:
            result = fn()
        barrier()
    return result


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is finite on *every* process (one all-reduce): all processes take the same decision,
    so a NaN on one rank stops them all together instead of leaving the others waiting in the next all-reduce."""
    finite = torch.isfinite(tensor.detach()).all()
    if not active():
        return bool(finite)
    flag = finite.to(torch.int32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
