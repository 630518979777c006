"""A replay buffer between the stream and the method: each training batch mixes arriving records with records
drawn from the buffer, so a stream delivered in the order it was produced does not train on one class at a time.

Eviction policies (`replay.policy`):
* `fifo`: the oldest record leaves (a sliding window of the stream).
* `reservoir`: the n-th arrival is kept with probability capacity / n, over a uniform random slot (a uniform
  sample of everything seen so far).
* `minred`: minimum redundancy (Purushwalkam, Morgado & Gupta, ECCV 2022): when full, the record whose feature
  is most similar to its nearest neighbour in the buffer leaves (an arrival that is itself the most redundant
  is not kept), so the buffer stays decorrelated. Features are the ones training computed (the backbone's
  output for the record's first view, L2-normalised), refreshed whenever a record is replayed; each slot
  keeps its nearest neighbour and its cosine, updated incrementally. Arrivals are decided one at a time, in
  order, on cosines computed once per call (one matrix product: the arrivals' and those of the records likely to
  lose their neighbour); a record whose neighbour left and whose row is not there gets its own.

Everything (images, ids, features, neighbours, counters, the sampling generator) is in `state_dict`, so a
resumed run draws and evicts exactly as a straight one.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Policy = Literal["fifo", "reservoir", "minred"]


class ReplayBuffer:
    """`capacity` decoded images (uint8) with their record ids and last features.

    Args:
        capacity: Records kept.
        policy: fifo | reservoir | minred (see the module docstring).
        image_shape: (C, H, W) of the decoded images.
        feature_dim: Width of the features stored per record.
        seed: Seed of the generator that draws replayed records and flips the reservoir's coins.
        device: Where images and features live (the training device: no copies per step).
    """

    def __init__(self, capacity: int, policy: Policy, image_shape: tuple[int, ...], feature_dim: int, seed: int,
                 device: torch.device) -> None:
        self.capacity, self.policy, self.device = capacity, policy, device
        self.images = torch.zeros(capacity, *image_shape, dtype=torch.uint8, device=device)
        self.ids = torch.zeros(capacity, dtype=torch.long, device=device)
        self.features = torch.zeros(capacity, feature_dim, device=device)
        self.nn_sim = torch.full((capacity,), -2.0, device=device)  # cosine to the nearest other record (-2: none)
        self.nn_index = torch.zeros(capacity, dtype=torch.long, device=device)
        self.size = self.arrived = self.evicted = self.dropped = self.next_slot = 0
        # host seconds in add and refresh since start (not checkpointed): its rate is the buffer's share of the time
        self.update_seconds = 0.0
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def nbytes(self) -> int:
        return sum(t.element_size() * t.nelement() for t in (self.images, self.ids, self.features, self.nn_sim,
                                                             self.nn_index))

    def draw(self, count: int) -> Tensor:
        """`count` distinct slots, uniformly at random (fewer while the buffer holds fewer)."""
        return torch.randperm(self.size, generator=self.generator)[:count].to(self.device)

    @torch.no_grad()
    def add(self, images: Tensor, ids: Tensor, features: Tensor) -> None:
        """Arrivals, in order, by the policy: each decision sees the writes of the arrivals before it in the call,
        as if they came one by one; the images, ids and fifo/reservoir features are written in bulk after."""
        started = time.perf_counter()
        features = F.normalize(features.float(), dim=1)
        if self.policy == "minred":
            slots, arrivals = self._minred_slots(features)
        else:
            slots, arrivals = self._fifo_or_reservoir_slots(len(features))
        self._write(slots, arrivals, images, ids, features if self.policy != "minred" else None)
        self.update_seconds += time.perf_counter() - started

    def _fifo_or_reservoir_slots(self, count: int) -> tuple[Tensor, Tensor]:
        """Where each arrival goes: the empty slots first, then the policy's victim; dropped arrivals are left out."""
        filling = min(count, self.capacity - self.size)
        slots = torch.arange(self.size, self.size + filling)
        evicting = count - filling
        if self.policy == "fifo":
            victims = (self.next_slot + torch.arange(evicting)) % self.capacity
            self.next_slot = (self.next_slot + evicting) % self.capacity
        else:
            victims = self._reservoir_draws(self.arrived + filling, evicting)
        kept = victims < self.capacity
        self.size, self.arrived = self.size + filling, self.arrived + count
        self.evicted += int(kept.sum())
        self.dropped += evicting - int(kept.sum())
        arrivals = torch.cat([torch.arange(filling), filling + kept.nonzero().flatten()])
        return torch.cat([slots, victims[kept]]), arrivals

    def _reservoir_draws(self, arrived: int, count: int) -> Tensor:
        """The next `count` arrivals' coins, the n-th arrival's uniform in [0, n). One `randint` call each, as
        before: how one call of many values maps onto the generator's words depends on n and on the torch build."""
        return torch.tensor([int(torch.randint(n, (1,), generator=self.generator))
                             for n in range(arrived + 1, arrived + count + 1)], dtype=torch.long)

    def _minred_slots(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """MinRed's decisions, one arrival at a time, on cosines computed once per call: of the arrivals and of the
        records likely to lose their nearest neighbour (those pointing at the most redundant slots, the likely
        victims), to every slot and to every arrival (which may have taken a slot by the time a later one decides)."""
        count, capacity = len(features), self.capacity
        suspects = self._pointing_at(self.nn_sim[:self.size].topk(min(count, self.size)).indices) \
            if self.size == capacity else torch.zeros(0, dtype=torch.long, device=self.device)
        queries = torch.cat([features, self.features[suspects]])
        similarity = torch.cat([queries @ self.features.T, queries @ features.T], dim=1)
        rows = {slot: count + i for i, slot in enumerate(suspects.tolist())}  # slot -> its row in `similarity`
        slots, arrivals = [], []
        for arrival in range(count):
            self.arrived += 1
            slot = self._minred_slot(similarity[arrival, :capacity])
            if slot is None:
                self.dropped += 1
                continue
            self.features[slot] = features[arrival]
            similarity[:, slot] = similarity[:, capacity + arrival]  # everyone now meets this arrival in that slot
            rows[slot] = arrival
            self._neighbours_after_write(slot, similarity[arrival, :self.size], similarity, rows)
            slots.append(slot)
            arrivals.append(arrival)
        return torch.tensor(slots, dtype=torch.long), torch.tensor(arrivals, dtype=torch.long)

    def _pointing_at(self, slots: Tensor) -> Tensor:
        """The filled slots whose nearest neighbour is one of `slots`, `slots` themselves left out."""
        pointing = torch.isin(self.nn_index[:self.size], slots)
        pointing[slots] = False
        return pointing.nonzero().flatten()

    def _minred_slot(self, similarity: Tensor) -> int | None:
        """Where an arrival with these cosines to every slot goes (evicting what is there), or None when it is not
        kept."""
        if self.size < self.capacity:
            self.size += 1
            return self.size - 1
        with_arrival = torch.maximum(self.nn_sim, similarity)
        slot = with_arrival.argmax()
        slot_value, kept = torch.stack([slot, similarity.max() < with_arrival[slot]]).tolist()  # one sync
        if not kept:  # the arrival is in the most redundant pair: it goes
            return None
        self.evicted += 1
        return int(slot_value)

    def _write(self, slots: Tensor, arrivals: Tensor, images: Tensor, ids: Tensor, features: Tensor | None) -> None:
        """Arrival `arrivals[i]` into `slots[i]`, in bulk; a slot taken twice in one call keeps the later arrival."""
        later = (slots[:, None] == slots[None, :]).triu(diagonal=1).any(dim=1)
        slots, arrivals = slots[~later].to(self.device), arrivals[~later].to(self.device)
        self.images[slots], self.ids[slots] = images[arrivals], ids[arrivals]
        if features is not None:
            self.features[slots] = features[arrivals]

    @torch.no_grad()
    def refresh(self, slots: Tensor, features: Tensor) -> None:
        """Features that training just computed for replayed records."""
        started = time.perf_counter()
        features = F.normalize(features.float(), dim=1)
        self.features[slots] = features
        if self.policy == "minred":
            self._refresh_neighbours(slots, features)
        self.update_seconds += time.perf_counter() - started

    def _refresh_neighbours(self, slots: Tensor, features: Tensor) -> None:
        # all written first, so no feature moves in the loop: the full rows of the refreshed records and of every
        # record that may lose its neighbour (one pointing at a refreshed slot) are one matrix product
        suspects = self._pointing_at(slots)
        similarity = torch.cat([features, self.features[suspects]]) @ self.features[:self.size].T
        order = slots.tolist()
        rows = {slot: i for i, slot in enumerate(order + suspects.tolist())}
        for slot in order:
            self._neighbours_after_write(slot, similarity[rows[slot]], similarity, rows)

    def _neighbours_after_write(self, slot: int, similarity: Tensor, full: Tensor, rows: dict[int, int]) -> None:
        """Nearest neighbours once `slot` holds a new feature, whose cosines to the filled slots are `similarity`:
        its own, whoever is now closer to it, and whoever had it as nearest neighbour (their neighbour may now be
        another record: their full row, from `full[rows[record]]` where it is there, else computed)."""
        filled = self.size
        similarity[slot] = -2.0
        pointed_here = (self.nn_index[:filled] == slot) & (similarity < self.nn_sim[:filled])
        closer = similarity > self.nn_sim[:filled]
        self.nn_sim[:filled] = torch.where(closer, similarity, self.nn_sim[:filled])
        self.nn_index[:filled] = torch.where(closer, slot, self.nn_index[:filled])
        if filled < 2:
            self.nn_sim[slot] = -2.0
            return
        self.nn_sim[slot], self.nn_index[slot] = similarity.max(dim=0)
        stale = pointed_here.nonzero().flatten().tolist()
        if stale:
            known = [record for record in stale if record in rows]
            computed = [record for record in stale if record not in rows]
            if known:
                self._nearest(torch.tensor(known, device=self.device),
                              full[torch.tensor([rows[record] for record in known], device=self.device), :filled])
            if computed:
                at = torch.tensor(computed, device=self.device)
                self._nearest(at, self.features[at] @ self.features[:filled].T)

    def _nearest(self, slots: Tensor, similarity: Tensor) -> None:
        """Nearest neighbours of `slots` from their cosines to every filled slot (a copy: their own is dropped)."""
        similarity[torch.arange(len(slots), device=self.device), slots] = -2.0
        self.nn_sim[slots], self.nn_index[slots] = similarity.max(dim=1)

    @torch.no_grad()
    def redundancy(self, chunk: int = 4096) -> float:
        """Mean cosine of each record to its nearest neighbour in the buffer (exact, every policy)."""
        if self.size < 2:
            return 0.0
        features, best = self.features[:self.size], []
        for start in range(0, self.size, chunk):
            similarity = features[start:start + chunk] @ features.T
            rows = torch.arange(similarity.shape[0], device=self.device)
            similarity[rows, rows + start] = -2.0
            best.append(similarity.max(dim=1).values)
        return float(torch.cat(best).mean())

    def logs(self) -> dict[str, float]:
        logs = {"replay_fill": self.size / self.capacity, "replay_bytes": float(self.nbytes),
                "replay_evicted": float(self.evicted), "replay_dropped": float(self.dropped),
                "replay_update_seconds": self.update_seconds}
        if self.policy == "minred" and self.size > 1:  # maintained anyway; exact for the others: `redundancy()`
            logs["replay_redundancy"] = float(self.nn_sim[:self.size].mean())
        return logs

    def state_dict(self) -> dict[str, Any]:
        counters = [self.size, self.arrived, self.evicted, self.dropped, self.next_slot]
        return {"images": self.images, "ids": self.ids, "features": self.features, "nn_sim": self.nn_sim,
                "nn_index": self.nn_index, "counters": torch.tensor(counters), "generator": self.generator.get_state(),
                "policy": self.policy}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["policy"] != self.policy or len(state["images"]) != self.capacity:
            raise ValueError(f"the checkpoint's replay buffer is {state['policy']} with {len(state['images'])} records, "
                             f"not {self.policy} with {self.capacity}")
        for name in ("images", "ids", "features", "nn_sim", "nn_index"):
            getattr(self, name).copy_(state[name])
        self.size, self.arrived, self.evicted, self.dropped, self.next_slot = state["counters"].tolist()
        self.generator.set_state(state["generator"])
