"""k-means, empty-cluster re-seeding, inverse-size weights and NMI against their definitions."""

import math

import pytest
import torch
import torch.nn.functional as F

from streamssl.models.kmeans import (
    inverse_size_weights,
    kmeans,
    nearest_centroid,
    normalized_mutual_info,
    split_empty_clusters,
)


def _blobs(per_blob: int = 20, num_blobs: int = 4, dim: int = 8, spread: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors around `num_blobs` orthogonal directions, and which blob each came from."""
    centers = torch.eye(dim)[:num_blobs]
    labels = torch.arange(num_blobs).repeat_interleave(per_blob)
    return F.normalize(centers[labels] + spread * torch.randn(len(labels), dim), dim=1), labels


def _inertia(features: torch.Tensor, centroids: torch.Tensor) -> float:
    return torch.cdist(features, centroids).min(dim=1).values.square().sum().item()


def test_nearest_centroid_is_the_euclidean_argmin() -> None:
    torch.manual_seed(0)
    features, centroids = torch.randn(50, 6), torch.randn(7, 6)
    expected = torch.tensor([min(range(7), key=lambda c: (x - centroids[c]).norm().item()) for x in features])
    torch.testing.assert_close(nearest_centroid(features, centroids), expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # computed in float32 regardless
        torch.testing.assert_close(nearest_centroid(features, centroids), expected)


def test_kmeans_lowers_the_inertia_of_its_initial_centroids_and_finds_separated_blobs() -> None:
    torch.manual_seed(0)
    features, blob = _blobs()
    init = features[[0, 20, 40, 60]] + 0.3 * torch.randn(4, 8)  # one per blob, well off its centre
    centroids, assignments, reassigned = kmeans(features, 4, 10, init_centroids=init)
    assert _inertia(features, centroids) < 0.5 * _inertia(features, init)
    assert normalized_mutual_info(assignments, blob).item() == pytest.approx(1.0)
    assert reassigned == 0
    # the returned centroids are the means of the returned clusters
    for cluster in range(4):
        torch.testing.assert_close(centroids[cluster], features[assignments == cluster].mean(dim=0))


def test_a_centroid_far_from_every_point_is_reseeded_and_no_cluster_stays_empty() -> None:
    torch.manual_seed(0)
    features, _ = _blobs(num_blobs=3)
    init = torch.cat([features[[0, 20, 40]], torch.full((2, 8), 100.0)])  # two centroids no point is near
    centroids, assignments, reassigned = kmeans(features, 5, 1, init_centroids=init)
    assert reassigned == 2
    sizes = torch.bincount(assignments, minlength=5)
    assert (sizes > 0).all() and sizes.sum() == len(features)
    assert centroids.abs().max() < 2  # the far-away centroids are gone: every centroid is a mean of unit vectors


def test_split_divides_a_donor_drawn_by_size_by_a_random_hyperplane_through_its_mean() -> None:
    torch.manual_seed(0)
    features = torch.randn(30, 5)
    assignments = torch.cat([torch.zeros(10), torch.ones(20)]).long()  # cluster 2 empty
    before = assignments.clone()
    rng = torch.get_rng_state()
    assert split_empty_clusters(features, assignments, 3) == 1

    torch.set_rng_state(rng)  # replay the two draws: the donor (weights = sizes), then the direction
    donor = int(torch.multinomial(torch.tensor([10.0, 20.0, 0.0], dtype=torch.float64), 1))
    direction = torch.randn(5)
    members = before == donor
    points = features[members]
    expected = before.clone()
    expected[members] = torch.where((points - points.mean(dim=0)) @ direction > 0, 2, donor)
    assert torch.equal(assignments, expected)
    assert torch.bincount(assignments, minlength=3).min() > 0


def test_split_skips_donors_whose_points_coincide() -> None:
    torch.manual_seed(0)
    same = torch.ones(1, 4).repeat(6, 1)
    distinct = torch.randn(2, 4)
    features = torch.cat([same, distinct])
    assignments = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    for _ in range(5):  # whichever donor is drawn first, only cluster 1 can give a point away
        trial = assignments.clone()
        assert split_empty_clusters(features, trial, 3) == 1
        assert trial.tolist() in ([0] * 6 + [1, 2], [0] * 6 + [2, 1])


def test_split_gives_up_without_enough_distinct_points() -> None:
    features = torch.ones(5, 3)
    assignments = torch.zeros(5, dtype=torch.long)
    assert split_empty_clusters(features, assignments, 2) == 0
    assert (assignments == 0).all()


def test_kmeans_is_reproducible_from_the_default_generator() -> None:
    torch.manual_seed(0)
    features, _ = _blobs()
    torch.manual_seed(5)
    first = kmeans(features, 6, 5)
    torch.manual_seed(5)
    second = kmeans(features, 6, 5)
    torch.testing.assert_close(first.centroids, second.centroids, rtol=0, atol=0)
    assert torch.equal(first.assignments, second.assignments)


def test_kmeans_rejects_more_clusters_than_points() -> None:
    with pytest.raises(ValueError, match="k-means needs"):
        kmeans(torch.randn(3, 2), 4, 1)


def test_inverse_size_weights_are_inverse_to_sizes_with_mean_one_over_samples() -> None:
    assignments = torch.tensor([0, 0, 0, 0, 1, 1, 3, 0])  # sizes 5, 2, 0, 1
    weights = inverse_size_weights(assignments, 4)
    # N / (non-empty clusters · size) = 8 / (3 · size)
    torch.testing.assert_close(weights, torch.tensor([8 / 15, 8 / 6, 0.0, 8 / 3]))
    assert weights[assignments].mean().item() == pytest.approx(1.0)
    sizes = torch.bincount(assignments, minlength=4).float()
    assert torch.allclose((weights * sizes)[sizes > 0], torch.full((3,), 8 / 3))  # every cluster weighs the same


def _nmi_by_definition(a: list[int], b: list[int]) -> float:
    n = len(a)
    count = {}
    for x, y in zip(a, b, strict=True):
        count[x, y] = count.get((x, y), 0) + 1
    p_a = {x: a.count(x) / n for x in set(a)}
    p_b = {y: b.count(y) / n for y in set(b)}
    mutual_info = sum(c / n * math.log((c / n) / (p_a[x] * p_b[y])) for (x, y), c in count.items())
    entropy_a = -sum(p * math.log(p) for p in p_a.values())
    entropy_b = -sum(p * math.log(p) for p in p_b.values())
    return mutual_info / ((entropy_a + entropy_b) / 2)


def test_nmi_matches_the_definition_on_random_labelings() -> None:
    torch.manual_seed(0)
    for _ in range(5):
        a, b = torch.randint(0, 5, (40,)), torch.randint(0, 3, (40,))
        b[:20] = a[:20] % 3  # partly dependent
        expected = _nmi_by_definition(a.tolist(), b.tolist())
        assert normalized_mutual_info(a, b).item() == pytest.approx(expected, rel=1e-9)


def test_nmi_known_values() -> None:
    # H(A) = ln 2, H(B) = 1.5 ln 2, I = ln 2  ->  ln 2 / 1.25 ln 2
    assert normalized_mutual_info(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 2])).item() == pytest.approx(0.8)
    labels = torch.tensor([3, 3, 1, 7, 7, 7, 1])
    assert normalized_mutual_info(labels, labels).item() == pytest.approx(1.0)
    assert normalized_mutual_info(torch.zeros(5), torch.zeros(5)).item() == 1.0  # scikit-learn's convention
    assert normalized_mutual_info(torch.zeros(4), torch.tensor([0, 1, 2, 3])).item() == 0.0
    # a product partition: knowing A says nothing about B
    a, b = torch.arange(4).repeat_interleave(4), torch.arange(4).repeat(4)
    assert normalized_mutual_info(a, b).item() == pytest.approx(0.0, abs=1e-12)


def test_nmi_is_symmetric_and_ignores_label_names() -> None:
    torch.manual_seed(0)
    a, b = torch.randint(0, 4, (60,)), torch.randint(0, 6, (60,))
    b[:40] = a[:40]
    renamed = torch.tensor([10, 2, 7, 5])[a]  # a permutation of a's cluster names (and other values)
    value = normalized_mutual_info(a, b).item()
    assert 0.2 < value < 1
    assert normalized_mutual_info(renamed, b).item() == pytest.approx(value, rel=1e-12)
    assert normalized_mutual_info(b, a).item() == pytest.approx(value, rel=1e-12)


def test_nmi_of_independent_large_labelings_is_near_zero() -> None:
    torch.manual_seed(0)
    a, b = torch.randint(0, 10, (20000,)), torch.randint(0, 10, (20000,))
    assert normalized_mutual_info(a, b).item() < 0.005
