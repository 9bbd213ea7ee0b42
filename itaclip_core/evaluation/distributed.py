"""Multi-process evaluation under `torchrun`: process group set-up, sharding and summing of counts.

Launched with `torchrun --nproc_per_node N ...`, each process reads RANK / WORLD_SIZE / LOCAL_RANK from the
environment, takes the images with `index % N == rank`, and the counts are summed with `all_reduce` (gloo on
CPU, nccl on GPU). A plain launch is a world of one process and needs no process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# Generous: a process that finishes its shard early waits here for the slowest one.
_TIMEOUT = timedelta(hours=4)


@dataclass
class DistContext:
    """This process's place in the evaluation."""

    rank: int = 0  # index of this process
    world_size: int = 1  # number of processes
    local_rank: int = 0  # index of this process on its machine (selects the GPU)
    device: str | None = None  # device the segmentor should use (None: its own default)
    backend: str | None = None  # "gloo" or "nccl" when a process group is used
    owns_group: bool = False  # the group was created here and is destroyed by `close`

    @property
    def is_main(self) -> bool:
        """The process that writes reports and shows the progress bar."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """A process group is in use."""
        return self.backend is not None

    def shard(self, indices: range | list[int]) -> list[int]:
        """The indices this process evaluates: those with `index % world_size == rank`."""
        return [i for i in indices if i % self.world_size == self.rank]

    def barrier(self) -> None:
        """Wait for all processes."""
        if self.active:
            dist.barrier()

    def all_reduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Elementwise int64 sum of `array` over all processes (exact)."""
        array = np.ascontiguousarray(array, dtype=np.int64)
        if not self.active:
            return array.copy()
        tensor = torch.from_numpy(array.copy())
        if self.backend == "nccl":
            tensor = tensor.to(f"cuda:{self.local_rank}")
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.cpu().numpy().astype(np.int64)

    def broadcast_from_main(self, value: Any) -> Any:
        """Rank 0's `value` on every process (any picklable object)."""
        if not self.active:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Destroy the process group if it was created by `init_distributed`."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def init_distributed(device: str | None = None) -> DistContext:
    """Join the process group that `torchrun` describes in the environment (if any).

    Args:
        device: the requested device ("cpu", "cuda", "cuda:1", or None for automatic). Under torchrun with
            CUDA, each process uses `cuda:<LOCAL_RANK>` and the nccl backend; otherwise gloo.

    Returns:
        The process's context; a single process gets rank 0 of 1 and no process group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size <= 1:
        return DistContext(device=device)
    wants_cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    if wants_cuda and not torch.cuda.is_available():
        from itaclip_core.errors import DeviceError

        raise DeviceError(f"--device {device} was asked for but CUDA is not available; use --device cpu")
    backend = "nccl" if wants_cuda else "gloo"
    if wants_cuda:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        device = device or "cpu"
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=_TIMEOUT)
        owns = True
    return DistContext(rank, world_size, local_rank, device, backend, owns)
