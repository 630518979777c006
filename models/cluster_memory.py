"""What DeepCluster (models/deepcluster.py) remembers of a stream between clusterings, in buffers it owns.

The paper clusters the features of the whole data set and labels every image once per clustering; an
image keeps that label until the next. A stream has no data set. Its stand-in is a ring of the latest
view-1 projections with their record ids, which k-means clusters (DeepCluster-v2 likewise clusters a
memory of the features of the last epoch), and a label memory: the ids the last clustering saw with their
assignments, sorted by id, so that a record the stream brings back is found by binary search on the
device, with no host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor

from streamssl.models.ring import oldest_first, ring_slots


@torch.no_grad()
def remember(ring: Tensor, ring_ids: Tensor, written: Tensor, features: Tensor, ids: Tensor | None) -> None:
    """Writes `features` [N, dim] and their record ids [N] (-1 without) over the oldest rows of the ring
    ([size, dim] and [size]; `written`, the rows written so far, a 0-d long buffer)."""
    if ids is None:
        ids = torch.full((len(features),), -1, dtype=torch.long, device=features.device)
    skipped, slots = ring_slots(written, len(features), len(ring))
    ring.index_copy_(0, slots, features[skipped:].to(ring.dtype))
    ring_ids.index_copy_(0, slots, ids[skipped:].to(ring_ids.device))
    written.add_(len(features))


def ring_contents(ring: Tensor, ring_ids: Tensor, written: Tensor) -> tuple[Tensor, Tensor]:
    """The filled rows of the ring [filled, dim] and their ids [filled], oldest first."""
    order = oldest_first(written, len(ring))
    return ring[order], ring_ids[order]


@torch.no_grad()
def memorize_labels(memory_ids: Tensor, memory_labels: Tensor, ids: Tensor, labels: Tensor) -> None:
    """Replaces the memory [size] with the records `ids` [N <= size], oldest first, and their `labels` [N].

    Unfilled slots come first as id -1 (never looked up); the stable sort keeps a revisited id's rows
    oldest first, so a lookup takes its newest label.
    """
    unfilled = len(memory_ids) - len(ids)
    all_ids = torch.cat([ids.new_full((unfilled,), -1), ids])
    all_labels = torch.cat([labels.new_zeros(unfilled), labels])
    sorted_ids, by_id = torch.sort(all_ids, stable=True)
    memory_ids.copy_(sorted_ids)
    memory_labels.copy_(all_labels[by_id])


@torch.no_grad()
def recall_labels(memory_ids: Tensor, memory_labels: Tensor, ids: Tensor | None,
                  fallback: Tensor) -> tuple[Tensor, Tensor]:
    """[N] labels of the records `ids` [N]: the remembered one, else `fallback`'s; and [N] bool, remembered.

    Without ids (a source that gives none) every label is the fallback."""
    if ids is None:
        return fallback, torch.zeros(len(fallback), dtype=torch.bool, device=fallback.device)
    ids = ids.to(memory_ids.device, torch.long)
    # memory_ids is sorted with equal ids oldest first: the last match is the newest.
    slot = (torch.searchsorted(memory_ids, ids, right=True) - 1).clamp(min=0)
    remembered = (memory_ids[slot] == ids) & (ids != -1)
    return torch.where(remembered, memory_labels[slot], fallback), remembered
