"""Fixed-size buffers of recent rows on the device: the rings of MoCo, CPC and DeepCluster, SwAV's queue.

Every method that remembers earlier batches keeps them in a buffer of its own `state_dict`; the index
arithmetic of writing and reading them in order lives here, once, and runs on the device (no host sync).
"""

from __future__ import annotations

import torch
from torch import Tensor


def ring_slots(next_write: Tensor, count: int, size: int) -> tuple[int, Tensor]:
    """Where `count` new rows go in a ring of `size` rows whose next write is slot `next_write` (mod size).

    More rows than the ring holds would overwrite their own first rows: only the last `size` are written.
    Returns how many leading rows are skipped for that, and the slots [min(count, size)] of the others.
    """
    skipped = max(count - size, 0)
    slots = (next_write + skipped + torch.arange(count - skipped, device=next_write.device)) % size
    return skipped, slots


def oldest_first(written: Tensor, size: int) -> Tensor:
    """Slots of a ring of `size` rows, `written` rows written so far, from its oldest row to its newest."""
    filled = min(int(written), size)
    # A ring that has wrapped starts at its next write slot.
    return (written - filled + torch.arange(filled, device=written.device)) % size


@torch.no_grad()
def write_ring(ring: Tensor, pointer: Tensor, written: Tensor, rows: Tensor) -> None:
    """Writes `rows` over the oldest rows of a ring buffer, wrapping around its end (MoCo's and CPC's queues).

    `pointer` (the next row to write) and `written` (rows written so far) are 0-d long buffers, updated on the
    device: no host sync per step.
    """
    skipped, slots = ring_slots(pointer, len(rows), len(ring))
    ring.index_copy_(0, slots, rows[skipped:].to(ring.dtype))
    pointer.copy_((pointer + len(rows)) % len(ring))
    written.add_(len(rows))


@torch.no_grad()
def push_newest_first(queue: Tensor, written: Tensor, rows: Tensor) -> None:
    """Puts `rows` [V, B, D] at the front of each of the V queues [V, size, D]; the oldest fall off the end.

    `written` (rows pushed to each queue so far) is a 0-d long buffer, updated on the device.
    """
    queue.copy_(torch.cat([rows.to(queue.dtype), queue], dim=1)[:, : queue.shape[1]])
    written.add_(rows.shape[1])
