"""NPID's set-associative memory bank (models/npid.py), as functions of the buffers the method owns.

The bank's tensors are buffers of the method, so its `state_dict` carries them; what is here is the index
bookkeeping on them, which is intricate and tested on its own: which slot of a record's set holds it,
drawing negatives among the written slots, and writing one batch (hits blend into their entry, misses take
a free or the least recently written slot of their set, a repeated id is written once). The slots of set
s are the contiguous rows s * ways .. s * ways + ways - 1; record id i lives in set i mod (rows / ways).
Every step is a tensor op: no host sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def lookup(bank_ids: Tensor, ids: Tensor, ways: int) -> tuple[Tensor, Tensor, Tensor]:
    """For each id: the slots of its set [N, ways], whether one holds it [N], and which one [N, valid on a hit]."""
    num_sets = len(bank_ids) // ways
    set_slots = (ids % num_sets)[:, None] * ways + torch.arange(ways, device=ids.device)
    match = bank_ids[set_slots] == ids[:, None]  # at most one match: an id is written to one slot only
    slot = set_slots.gather(1, match.int().argmax(dim=1, keepdim=True)).squeeze(1)
    return set_slots, match.any(dim=1), slot


def sample_filled_slots(filled: Tensor, count: int) -> Tensor:
    """`count` slots drawn uniformly, with replacement, among the `filled` ones (slot 0 if none is)."""
    running = filled.cumsum(0)
    filled_count = running[-1]
    # Drawn on the CPU from torch's default generator: the same draws on CPU and CUDA, reproducible from
    # torch.get_rng_state() alone. The k-th filled slot is the first whose running count reaches k + 1.
    draws = torch.rand(count).to(filled.device)
    k = torch.minimum((draws * filled_count).long(), filled_count - 1)  # the min guards float rounding up
    return torch.searchsorted(running, k + 1)


@torch.no_grad()
def write_bank(bank: Tensor, bank_ids: Tensor, bank_written: Tensor, bank_clock: Tensor, embeddings: Tensor,
               ids: Tensor, ways: int, momentum: float) -> None:
    """One batch into the bank: hits blend into their entry, misses take a free or the oldest slot of their set.

    Args:
        bank: [slots, dim] entries; bank_ids: [slots] the id each slot holds (-1: none); bank_written: [slots]
            `bank_clock` of each slot's last write (-1: never); bank_clock: 0-d, writes so far. All updated.
        embeddings: [N, dim] L2-normalised embeddings of the records `ids` [N] (repeats allowed).
        ways: slots per set; momentum: entry <- normalize(m · entry + (1 - m) · embedding) on a hit.

    Every row writes to some slot, and all rows writing one slot write the same values (those of the
    row that owns the write), so `index_copy_` is deterministic even where CUDA applies repeated
    indices in any order, and no shape depends on the data (no host sync).
    """
    num_sets = len(bank_ids) // ways
    rows = torch.arange(len(ids), device=ids.device)
    set_slots, hits, hit_slots = lookup(bank_ids, ids, ways)
    last_of_id = _last_of_run(ids)
    is_last = last_of_id == rows
    # A slot holding an id of this batch is being hit: new records must not take it over.
    taken = torch.isin(bank_ids[set_slots], ids)
    free = (~taken).sum(dim=1)
    # Free slots of the set, empty ones (written at -1) first, then least recently written.
    age_order = torch.where(taken, torch.iinfo(torch.long).max, bank_written[set_slots]).argsort(dim=1, stable=True)
    # New records of a set rank by how many of them come later in the batch: the latest get the slots.
    new = is_last & ~hits
    later = _later_in_run(torch.where(new, ids % num_sets, num_sets + rows))
    granted = new & (later < free)
    # A record that gets no slot writes, without owning it, into one that another record owns.
    pick = torch.where(free > 0, later % free.clamp(min=1), 0)
    claimed = set_slots.gather(1, age_order.gather(1, pick[:, None])).squeeze(1)
    # Earlier rows of an id write where its last row does.
    targets = torch.where(hits, hit_slots, claimed)[last_of_id]
    owns = (is_last & hits) | granted
    owner = _owner_of_target(targets, owns)

    blended = F.normalize(momentum * bank[targets] + (1 - momentum) * embeddings, dim=1)
    entries = torch.where(hits[:, None], blended, embeddings)
    bank.index_copy_(0, targets, entries[owner].to(bank.dtype))
    bank_ids.index_copy_(0, targets, ids[owner])
    bank_written.index_copy_(0, targets, bank_clock.expand(len(targets)))
    bank_clock.add_(1)


def _runs(keys: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A stable sort of `keys`; per element its position in it and the last position of its key's run."""
    order = keys.argsort(stable=True)
    return order, order.argsort(), torch.searchsorted(keys[order], keys, right=True) - 1


def _last_of_run(keys: Tensor) -> Tensor:
    """Per element, the index of the last element with the same key."""
    order, _, last = _runs(keys)
    return order[last]


def _later_in_run(keys: Tensor) -> Tensor:
    """Per element, how many later elements have the same key."""
    _, position, last = _runs(keys)
    return last - position  # the sort is stable: within a key, sorted positions follow the elements' order


def _owner_of_target(targets: Tensor, owns: Tensor) -> Tensor:
    """Per element, the index of the element with the same target that owns it (exactly one does)."""
    order = (targets * 2 + (~owns).long()).argsort()  # by target, its owner first
    return order[torch.searchsorted(targets[order], targets)]
