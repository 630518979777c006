"""The batched `ReplayBuffer.add` and `refresh` decide exactly as the one-arrival-at-a-time loop they replaced
(`LoopReplayBuffer`, kept here as the oracle): same slots, evictions, drops, neighbours and generator state, on
random sequences that fill the buffer, evict, take one slot twice in a call and refresh.

MinRed's bit-identity needs the same cosines on both sides, but matrix-vector and matrix products round
differently in the last bit (the loop's own products do too, between lengths). That decides real choices: the most
redundant pair is two mutual neighbours holding the same cosine computed twice, and which of the two leaves is
then up to that last bit, in the loop as in the batched form. So MinRed is compared on features whose arithmetic is
exact (dyadic entries, unit norm: every cosine a multiple of 1/16, with many ties, so the tie rules are compared
too); fifo and reservoir, whose decisions read no cosine, on Gaussian ones as well."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from streamssl.pipeline.replay import ReplayBuffer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # CUDA: duplicate slots in one write
pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: two threads on busy cores only wait
STATE = ("images", "ids", "features", "nn_sim", "nn_index")


class LoopReplayBuffer(ReplayBuffer):
    """`add` and `refresh` as they were: a Python loop over the arrivals, one matrix-vector product each."""

    @torch.no_grad()
    def add(self, images: Tensor, ids: Tensor, features: Tensor) -> None:
        features = F.normalize(features.float(), dim=1)
        for image, record_id, feature in zip(images, ids, features, strict=True):
            self.arrived += 1
            slot = self._loop_slot_for(feature)
            if slot is None:
                self.dropped += 1
                continue
            self.images[slot], self.ids[slot], self.features[slot] = image, record_id, feature
            if self.policy == "minred":
                self._loop_neighbours_after_write(slot)

    def _loop_slot_for(self, feature: Tensor) -> int | None:
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
            if similarity.max() >= with_arrival[slot]:
                return None
        self.evicted += 1
        return slot

    @torch.no_grad()
    def refresh(self, slots: Tensor, features: Tensor) -> None:
        self.features[slots] = F.normalize(features.float(), dim=1)
        if self.policy == "minred":
            for slot in slots.tolist():
                self._loop_neighbours_after_write(slot)

    def _loop_neighbours_after_write(self, slot: int) -> None:
        filled = self.size
        similarity = self.features[:filled] @ self.features[slot]
        similarity[slot] = -2.0
        pointed_here = (self.nn_index[:filled] == slot) & (similarity < self.nn_sim[:filled])
        closer = similarity > self.nn_sim[:filled]
        self.nn_sim[:filled] = torch.where(closer, similarity, self.nn_sim[:filled])
        self.nn_index[:filled] = torch.where(closer, slot, self.nn_index[:filled])
        stale = pointed_here.nonzero().flatten()
        self._loop_recompute(torch.cat([stale, torch.tensor([slot], device=self.device)]))

    def _loop_recompute(self, slots: Tensor) -> None:
        if self.size < 2:
            self.nn_sim[slots] = -2.0
            return
        similarity = self.features[slots] @ self.features[:self.size].T
        similarity[torch.arange(len(slots), device=self.device), slots] = -2.0
        self.nn_sim[slots], self.nn_index[slots] = similarity.max(dim=1)


def exact_features(count: int, dim: int, generator: torch.Generator, earlier: Tensor | None) -> Tensor:
    """Unit vectors of 1 x ±1, 4 x ±1/2, 16 x ±1/4 or 2 x ±1/2 + 8 x ±1/4 entries (every product and sum exact),
    scaled by a power of two (normalising them is exact too); one in five repeats an earlier arrival exactly."""
    rows = []
    for _ in range(count):
        pattern = int(torch.randint(5, (1,), generator=generator))
        if pattern == 4 and earlier is not None and len(earlier):
            rows.append(earlier[int(torch.randint(len(earlier), (1,), generator=generator))])
            continue
        values = [[1.0], [0.5] * 4, [0.25] * 16, [0.5] * 2 + [0.25] * 8, [0.5] * 4][pattern]
        row = torch.zeros(dim)
        where = torch.randperm(dim, generator=generator)[:len(values)]
        signs = torch.randint(2, (len(values),), generator=generator) * 2 - 1
        row[where] = torch.tensor(values) * signs
        rows.append(row * 2.0 ** int(torch.randint(-2, 3, (1,), generator=generator)))
    return torch.stack(rows) if rows else torch.zeros(0, dim)


def run_both(policy: str, exact: bool, seed: int, capacity: int = 24, dim: int = 32, calls: int = 60,
             arrived: int = 0, device: str = "cpu") -> ReplayBuffer:
    """Both buffers through the same random calls, compared after each; the batched one is returned."""
    generator = torch.Generator().manual_seed(seed)
    new = ReplayBuffer(capacity, policy, (1, 2, 2), dim, seed, torch.device(device))  # type: ignore[arg-type]
    old = LoopReplayBuffer(capacity, policy, (1, 2, 2), dim, seed, torch.device(device))  # type: ignore[arg-type]
    new.arrived = old.arrived = arrived
    seen, first_id = torch.zeros(0, dim), 0
    for call in range(calls):
        # 0 to 2 x capacity arrivals: calls that straddle filling and evicting, and calls that evict one slot twice
        count = int(torch.randint(0, 2 * capacity + 1 if call % 3 == 1 else 9, (1,), generator=generator))
        features = exact_features(count, dim, generator, seen) if exact else torch.randn(count, dim, generator=generator)
        seen = torch.cat([seen, features])[-200:]
        ids, first_id = torch.arange(first_id, first_id + count), first_id + count
        images = torch.randint(0, 256, (count, 1, 2, 2), dtype=torch.uint8, generator=generator)
        images, ids, features = images.to(device), ids.to(device), features.to(device)
        for buf in (new, old):
            buf.add(images, ids, features)
        if new.size > 4 and call % 3 == 0:
            slots = new.draw(4)
            assert torch.equal(slots, old.draw(4))
            refreshed = exact_features(4, dim, generator, seen) if exact else torch.randn(4, dim, generator=generator)
            for buf in (new, old):
                buf.refresh(slots, refreshed.to(device))
        assert_same(new, old, f"{policy}, call {call}")
    return new


def assert_same(new: ReplayBuffer, old: ReplayBuffer, where: str) -> None:
    counters = ("size", "arrived", "evicted", "dropped", "next_slot")
    assert [getattr(new, c) for c in counters] == [getattr(old, c) for c in counters], where
    assert torch.equal(new.generator.get_state(), old.generator.get_state()), where
    for name in STATE:
        assert torch.equal(getattr(new, name), getattr(old, name)), f"{where}: {name}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["fifo", "reservoir", "minred"])
@pytest.mark.parametrize(("seed", "capacity"), [(0, 24), (1, 24), (2, 24), (4, 32)])  # (4, 32): a slot taken from
# a record whose row was computed up front, whose new record then loses its neighbour in the same call
def test_add_and_refresh_are_bit_identical_to_the_loop_on_exact_features(policy: str, seed: int, capacity: int,
                                                                         device: str) -> None:
    buf = run_both(policy, exact=True, seed=seed, capacity=capacity, device=device)
    assert buf.evicted > 2 * buf.capacity and (policy == "fifo" or buf.dropped > buf.capacity), (buf.evicted,
                                                                                                   buf.dropped)


@pytest.mark.parametrize("policy", ["fifo", "reservoir"])
def test_fifo_and_reservoir_are_bit_identical_to_the_loop_on_gaussian_features(policy: str) -> None:
    buf = run_both(policy, exact=False, seed=7)
    assert buf.evicted > 2 * buf.capacity


def test_reservoir_past_two_to_the_28_arrivals_draws_as_the_loop() -> None:
    # torch draws an integer below n from one 32-bit word for n < 2**28 and from two above (this build): one call
    # per arrival, as the loop made, keeps the generator where the loop left it on both sides of that bound
    buf = run_both("reservoir", exact=True, seed=3, calls=30, arrived=2**28 - 60)
    assert buf.arrived > 2**28 + 50 and buf.size == buf.capacity
