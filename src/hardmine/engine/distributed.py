"""PyTorch's own DDP, started by ``torchrun``: the process group, the device and per-rank seeds.

``torchrun --nproc-per-node N -m hardmine.cli train ...`` sets ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE`` and the rendezvous address; a single ``hardmine train`` sets none of them and runs
in one process with no process group. Backends: NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from hardmine.errors import ConfigError


@dataclass(frozen=True)
class Process:
    """This process's place in the run.

    Attributes:
        rank: 0 .. world_size - 1; rank 0 writes the run directory.
        world_size: processes in the run.
        device: where this process trains.
    """

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, *, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> CUDA when available, else the CPU; ``"cuda"`` -> this process's GPU.

    Raises:
        ConfigError: a name torch does not know, or CUDA asked for where there is none.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: this machine has no CUDA device; use cpu or auto")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


@contextmanager
def process_group(device: str) -> Iterator[Process]:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Initialises the group when ``WORLD_SIZE > 1`` and none exists yet, and destroys it on exit
    when it was created here (a caller that made its own group keeps it).

    Args:
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    resolved = resolve_device(device, local_rank=local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    created = world_size > 1 and not dist.is_initialized()
    if created:
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    try:
        yield Process(rank=rank, world_size=world_size, device=resolved)
    finally:
        if created:
            dist.destroy_process_group()


def rank_seed(seed: int, rank: int, *streams: int) -> int:
    """A seed for ``rank``'s generators, well mixed so that no two (seed, rank) pairs collide;
    ``streams`` (an epoch) give further independent seeds for the same pair."""
    entropy = [seed, rank, *streams]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


def mean_over_processes(values: Tensor) -> Tensor:
    """The mean of ``values`` over all processes (itself in a single process)."""
    if not dist.is_initialized():
        return values
    values = values.clone()
    dist.all_reduce(values)  # SUM: gloo has no AVG
    return values / dist.get_world_size()


def barrier() -> None:
    """Wait for every process (nothing in a single process)."""
    if dist.is_initialized():
        dist.barrier()


def wrap(model: nn.Module, process: Process) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` when the run has more than one process."""
    if not process.distributed:
        return model
    device_ids = [process.device.index] if process.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The detector inside a ``DistributedDataParallel`` wrapper (or ``model`` itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
