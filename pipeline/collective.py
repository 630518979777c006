"""What the workers of one run must agree on, injected into the loop: identity for one process, torch.distributed
for a group of workers (Ray Train), so that the loop itself has no multi-worker branches.

Workers must take the same decision at the same step, or a collective waits forever: whether to stop (a stop
request, the time budget, the end of one worker's stream), whether a checkpoint is due by time, and whether the
loss is finite (its mean over workers). Rank 0 alone evaluates, publishes and writes files.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class Collective:
    """One process: every agreement is its own decision."""

    rank = 0
    world_size = 1

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over workers, as a number (a host sync)."""
        return float(value.detach())

    def any(self, *flags: bool) -> list[bool]:
        """Per flag: whether it is set on any worker."""
        return list(flags)

    def min_int(self, value: int) -> int:
        return value

    def gather(self, obj: Any) -> list[Any]:
        """Every worker's `obj`, in rank order."""
        return [obj]

    def barrier(self) -> None:
        pass


class DistributedCollective(Collective):
    """The workers of an initialised torch.distributed group (gloo on CPU, NCCL on GPU)."""

    def __init__(self, device: torch.device) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        # NCCL reduces only CUDA tensors; gloo only CPU ones.
        self.device = device if dist.get_backend() == "nccl" else torch.device("cpu")

    def _max(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.tolist()

    def mean(self, value: torch.Tensor) -> float:
        total = value.detach().float().reshape(1).to(self.device)
        dist.all_reduce(total)
        return float(total) / self.world_size

    def any(self, *flags: bool) -> list[bool]:
        return [bool(v) for v in self._max([float(flag) for flag in flags])]

    def min_int(self, value: int) -> int:
        return int(-self._max([-float(value)])[0])

    def gather(self, obj: Any) -> list[Any]:
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        dist.barrier()


def collective_for(device: torch.device) -> Collective:
    """The group this process belongs to: torch.distributed with more than one worker, else itself alone."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DistributedCollective(device)
    return Collective()
