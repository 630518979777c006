"""Collectives the methods need when one model trains on several workers (torch.distributed data parallel).

DDP averages gradients, but a method's memory of earlier batches (MoCo's key queue, SwAV's feature
queue, NPID's memory bank, DeepCluster's feature buffer) is written outside autograd. For every worker
to hold the same memory, and for that memory to hold the whole global batch as in the papers' multi-GPU
code, each worker gathers what it is about to store from all workers first. With torch.distributed not
initialised, or a world of one, every function here is an identity: single-process training stays
bit-identical.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of workers training this model together; 1 without torch.distributed."""
    return dist.get_world_size() if _active() else 1


def rank() -> int:
    """This worker's index in [0, world_size()); 0 without torch.distributed."""
    return dist.get_rank() if _active() else 0


@torch.no_grad()
def gather_from_all(tensor: Tensor, dim: int = 0) -> Tensor:
    """Every worker's `tensor`, concatenated along `dim` in rank order; the same result on every worker.

    All workers must call it at the same point with tensors of the same shape and dtype (the trainer's
    batches all have `train.batch_size` rows). No gradient flows back through the gathered copies: what
    is gathered here is stored, not trained through.
    """
    workers = world_size()
    if workers == 1:
        return tensor
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(workers)]
    dist.all_gather(parts, tensor)
    return torch.cat(parts, dim=dim)
