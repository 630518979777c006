"""The replay buffer: MinRed evicts the most redundant record on constructed cases, its incremental nearest
neighbours equal brute force, FIFO and reservoir keep what they promise, and resume is exact."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from streamssl.pipeline.replay import ReplayBuffer

CPU = torch.device("cpu")


def buffer(capacity: int, policy: str, dim: int = 4, seed: int = 0) -> ReplayBuffer:
    return ReplayBuffer(capacity, policy, (1, 2, 2), dim, seed, CPU)  # type: ignore[arg-type]


def add(buf: ReplayBuffer, ids: list[int], features: torch.Tensor) -> None:
    images = (torch.tensor(ids) % 256).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    buf.add(images, torch.tensor(ids), features)


def test_minred_evicts_one_of_the_most_similar_pair_and_keeps_a_new_direction() -> None:
    buf = buffer(4, "minred")
    e = torch.eye(4)
    add(buf, [0, 1, 2, 3], torch.stack([e[0], e[1], e[2], e[0] + 0.1 * e[1]]))  # 0 and 3: a near-duplicate pair
    add(buf, [4], e[3].view(1, -1))
    kept = set(buf.ids.tolist())
    assert 4 in kept and {1, 2} <= kept and len(kept & {0, 3}) == 1
    assert (buf.evicted, buf.dropped) == (1, 0)
    assert (buf.images[buf.ids == 4] == 4).all()  # the image went with its id


def test_minred_does_not_keep_an_arrival_that_duplicates_a_record() -> None:
    buf = buffer(3, "minred")
    e = torch.eye(4)
    add(buf, [0, 1, 2], e[:3])
    add(buf, [9], (e[1] + 0.01 * e[3]).view(1, -1))
    assert sorted(buf.ids.tolist()) == [0, 1, 2] and buf.dropped == 1


def brute_force_neighbours(buf: ReplayBuffer) -> torch.Tensor:
    similarity = buf.features[:buf.size] @ buf.features[:buf.size].T
    similarity.fill_diagonal_(-2.0)
    return similarity.max(dim=1).values


def test_incremental_neighbours_equal_brute_force_after_adds_and_refreshes() -> None:
    torch.manual_seed(0)
    buf = buffer(64, "minred", dim=8)
    for step in range(40):
        add(buf, list(range(step * 8, step * 8 + 8)), torch.randn(8, 8))
        if buf.size > 10:
            slots = buf.draw(5)
            buf.refresh(slots, torch.randn(5, 8))
        torch.testing.assert_close(buf.nn_sim[:buf.size], brute_force_neighbours(buf))
    assert abs(buf.redundancy() - float(brute_force_neighbours(buf).mean())) < 1e-5


def test_minred_keeps_every_direction_of_a_correlated_stream_fifo_only_the_last() -> None:
    torch.manual_seed(0)
    centres = F.normalize(torch.randn(10, 16), dim=1)
    # runs of 50 near-identical records from one of ten directions, as a camera or a category in a row
    features = torch.cat([centres[i % 10] + 0.05 * torch.randn(50, 16) for i in range(20)])
    results = {}
    for policy in ("fifo", "minred"):
        buf = buffer(40, policy, dim=16)
        for start in range(0, len(features), 10):
            add(buf, list(range(start, start + 10)), features[start:start + 10])
        results[policy] = (len(set((buf.ids // 50 % 10).tolist())), buf.redundancy())
    assert results["fifo"][0] == 1 and results["minred"][0] == 10, results
    assert results["minred"][1] < results["fifo"][1], results


def test_fifo_keeps_the_newest_and_reservoir_a_uniform_sample() -> None:
    fifo = buffer(10, "fifo")
    add(fifo, list(range(25)), torch.randn(25, 4))
    assert sorted(fifo.ids.tolist()) == list(range(15, 25)) and fifo.evicted == 15
    reservoir = buffer(200, "reservoir")
    for start in range(0, 4000, 100):
        add(reservoir, list(range(start, start + 100)), torch.randn(100, 4))
    early = (reservoir.ids < 2000).float().mean()
    assert 0.4 < early < 0.6 and reservoir.evicted + reservoir.dropped == 3800


def test_resume_draws_and_evicts_exactly_as_a_straight_run() -> None:
    torch.manual_seed(0)
    stream = [torch.randn(6, 4) for _ in range(12)]
    straight, first = buffer(16, "minred", seed=3), buffer(16, "minred", seed=3)
    for i, features in enumerate(stream):
        add(straight, list(range(i * 6, i * 6 + 6)), features)
        straight.refresh(straight.draw(3), features[:3])
        if i < 6:
            add(first, list(range(i * 6, i * 6 + 6)), features)
            first.refresh(first.draw(3), features[:3])
    resumed = buffer(16, "minred", seed=99)
    resumed.load_state_dict(first.state_dict())
    for i, features in enumerate(stream[6:], start=6):
        add(resumed, list(range(i * 6, i * 6 + 6)), features)
        resumed.refresh(resumed.draw(3), features[:3])
    for name in ("images", "ids", "features", "nn_sim", "nn_index"):
        assert torch.equal(getattr(resumed, name), getattr(straight, name)), name
    assert torch.equal(resumed.draw(8), straight.draw(8))


def test_update_seconds_count_the_time_in_add_and_refresh() -> None:
    buf = buffer(16, "minred")
    assert buf.logs()["replay_update_seconds"] == 0.0
    add(buf, list(range(20)), torch.randn(20, 4))
    after_add = buf.logs()["replay_update_seconds"]
    buf.refresh(buf.draw(4), torch.randn(4, 4))
    assert 0 < after_add < buf.logs()["replay_update_seconds"] < 60
