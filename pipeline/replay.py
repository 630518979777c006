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
  keeps its nearest neighbour and its cosine, updated incrementally (one matrix-vector product per arrival).

Everything (images, ids, features, neighbours, counters, the sampling generator) is in `state_dict`, so a
resumed run draws and evicts exactly as a straight one.
"""

from __future__ import annotations

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
        """Arrivals, one by one, by the policy."""
        features = F.normalize(features.float(), dim=1)
        for image, record_id, feature in zip(images, ids, features, strict=True):
            self.arrived += 1
            slot = self._slot_for(feature)
            if slot is None:
                self.dropped += 1
                continue
            self.images[slot], self.ids[slot], self.features[slot] = image, record_id, feature
            if self.policy == "minred":
                self._neighbours_after_write(slot)

    def _slot_for(self, feature: Tensor) -> int | None:
        """Where an arrival goes (evicting what is there), or None when it is not kept."""
        if self.size < self.capacity:
            self.size += 1
            return self.size - 1
        if self.policy == "fifo":
            slot, self.next_slot = self.next_slot, (self.next_slot + 1) % self.capacity
        elif self.policy == "reservoir":
            slot = int(torch.randint(self.arrived, (1,), generator=self.generator))
            if slot >= self.capacity:
                return None
        else:
            similarity = self.features @ feature
            with_arrival = torch.maximum(self.nn_sim, similarity)
            slot = int(with_arrival.argmax())
            if similarity.max() >= with_arrival[slot]:  # the arrival is in the most redundant pair: it goes
                return None
        self.evicted += 1
        return slot

    @torch.no_grad()
    def refresh(self, slots: Tensor, features: Tensor) -> None:
        """Features that training just computed for replayed records."""
        self.features[slots] = F.normalize(features.float(), dim=1)
        if self.policy == "minred":
            for slot in slots.tolist():
                self._neighbours_after_write(slot)

    def _neighbours_after_write(self, slot: int) -> None:
        """Nearest neighbours once `slot` holds a new feature: its own, whoever is now closer to it, and whoever
        had it as nearest neighbour (their neighbour may now be another record)."""
        filled = self.size
        similarity = self.features[:filled] @ self.features[slot]
        similarity[slot] = -2.0
        pointed_here = (self.nn_index[:filled] == slot) & (similarity < self.nn_sim[:filled])
        closer = similarity > self.nn_sim[:filled]
        self.nn_sim[:filled] = torch.where(closer, similarity, self.nn_sim[:filled])
        self.nn_index[:filled] = torch.where(closer, slot, self.nn_index[:filled])
        stale = pointed_here.nonzero().flatten()
        self._recompute(torch.cat([stale, torch.tensor([slot], device=self.device)]))

    def _recompute(self, slots: Tensor) -> None:
        if self.size < 2:
            self.nn_sim[slots] = -2.0
            return
        similarity = self.features[slots] @ self.features[:self.size].T
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
                "replay_evicted": float(self.evicted), "replay_dropped": float(self.dropped)}
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
