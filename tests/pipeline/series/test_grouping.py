"""Component grouping: correlations against their definitions, splits against brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from streamssl.pipeline.series.grouping import component_correlations, dtw_distance, group_components


def test_pearson_is_the_mean_absolute_correlation_and_padding_scores_zero():
    rng = np.random.default_rng(0)
    windows = rng.standard_normal((6, 40))
    components = np.stack([windows + 0.5 * rng.standard_normal((6, 40)), -windows, rng.standard_normal((6, 40)),
                           np.zeros((6, 40))], axis=1)
    expected = [np.mean([abs(np.corrcoef(w, c)[0, 1]) for w, c in zip(windows, components[:, k], strict=True)])
                for k in range(3)]
    got = component_correlations(windows, components)
    np.testing.assert_allclose(got[:3], expected, rtol=1e-12)
    assert got[1] == pytest.approx(1.0) and got[3] == 0.0


def dtw_reference(a: np.ndarray, b: np.ndarray) -> float:
    table = np.full((len(a) + 1, len(b) + 1), np.inf)
    table[0, 0] = 0.0
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i, j] = abs(a[i - 1] - b[j - 1]) + min(table[i - 1, j], table[i, j - 1], table[i - 1, j - 1])
    return float(table[-1, -1])


def test_dtw_distance_matches_the_textbook_recursion():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((4, 11)), rng.standard_normal((4, 11))
    np.testing.assert_allclose(dtw_distance(a, b), [dtw_reference(x, y) for x, y in zip(a, b, strict=True)])
    shifted = np.roll(a, 1, axis=1)
    assert (dtw_distance(a, shifted) < np.abs(a - shifted).sum(axis=1)).all()  # warping absorbs the shift
    np.testing.assert_array_equal(dtw_distance(a, a), 0.0)


def test_dtw_similarity_ranks_a_copy_above_noise():
    rng = np.random.default_rng(2)
    windows = np.sin(np.arange(30) / 3)[None] + 0.1 * rng.standard_normal((3, 30))
    components = np.stack([2 * windows + 1, rng.standard_normal((3, 30)), np.zeros((3, 30))], axis=1)
    similarity = component_correlations(windows, components, method="dtw")
    assert similarity[0] == pytest.approx(1.0)  # same shape after z-normalisation
    assert 0 < similarity[1] < similarity[0] and similarity[2] == 0.0


def brute_force_two_means(values: np.ndarray) -> float:
    """Least within-group sum of squares over every split into two non-empty groups."""
    best = np.inf
    for size in range(1, len(values)):
        for group in itertools.combinations(range(len(values)), size):
            inside = np.isin(np.arange(len(values)), group)
            cost = sum(float(np.sum((v - v.mean()) ** 2)) for v in (values[inside], values[~inside]))
            best = min(best, cost)
    return best


def test_two_means_split_is_optimal():
    rng = np.random.default_rng(3)
    cases = [rng.uniform(0, 1, size) for size in range(2, 8) for _ in range(4)]
    cases += [np.array([0.9, 0.1, 0.5, 0.5]), np.array([0.3, 0.3, 0.3])]  # ties
    for values in cases:
        aux, views = group_components(values, rule="two_means")
        assert aux and views and sorted(aux + views) == list(range(len(values)))
        assert aux == sorted(aux) and views == sorted(views)
        cost = sum(float(np.sum((values[g] - values[g].mean()) ** 2)) for g in (aux, views))
        assert cost == pytest.approx(brute_force_two_means(values), abs=1e-12)
        assert values[aux].min() >= values[views].max()  # the high group is the aux group


def test_two_means_on_a_clear_gap():
    assert group_components(np.array([0.95, 0.1, 0.88, 0.15, 0.05])) == ([0, 2], [1, 3, 4])


def test_threshold_rule_and_its_fallbacks():
    values = np.array([0.7, 0.2, 0.5, 0.49])
    assert group_components(values, rule="threshold", threshold=0.5) == ([0, 2], [1, 3])
    assert group_components(values, rule="threshold", threshold=0.1) == ([0, 2, 3], [1])  # all above: lowest is a view
    assert group_components(values, rule="threshold", threshold=0.9) == ([0], [1, 2, 3])  # none above: highest is aux
    assert group_components(np.array([0.4]), rule="threshold") == ([0], [])
    assert group_components(np.array([]), rule="two_means") == ([], [])
    assert group_components(np.array([np.nan, 0.8]), rule="threshold") == ([1], [0])


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        group_components(np.array([0.1, 0.2]), rule="kmeans")
    with pytest.raises(ValueError):
        component_correlations(np.zeros((2, 5)), np.zeros((2, 3, 5)), method="spearman")
    with pytest.raises(ValueError):
        component_correlations(np.zeros((2, 5)), np.zeros((3, 3, 5)))
