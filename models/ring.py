"""A ring buffer of rows on the device: MoCo's negative queue and CPC's latent queue."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def write_ring(ring: Tensor, pointer: Tensor, written: Tensor, rows: Tensor) -> None:
    """Writes `rows` over the oldest rows of a ring buffer, wrapping around its end (MoCo's and CPC's queues).

    `pointer` (the next row to write) and `written` (rows written so far) are 0-d long buffers, updated on the
    device: no host sync per step. More rows than the ring holds would overwrite their own first rows: only
    the last len(ring) are kept.
    """
    size, count = len(ring), len(rows)
    kept = rows[-size:]
    first_slot = pointer + (count - len(kept))
    slots = (first_slot + torch.arange(len(kept), device=rows.device)) % size
    ring.index_copy_(0, slots, kept.to(ring.dtype))
    pointer.copy_((pointer + count) % size)
    written.add_(count)
