"""Which decomposition components become auxiliary targets and which become input views.

The self-boosted forecaster (Nguyen et al. 2019, "Self-boosted Time-series Forecasting with Multi-task and
Multi-view Learning", arXiv:1909.08181) measures how closely each EEMD component (IMFs and the residue)
follows the original series: closely related components are forecast as auxiliary tasks (multi-task
learning), loosely related ones are fed as extra input views (multi-view learning). Here the relation is
the mean over windows of |Pearson correlation| (or a DTW similarity) between a component and its window,
and the split is either a fixed threshold or the exact 1-D 2-means split of those values. Pure functions.
"""

from __future__ import annotations

import numpy as np

CORRELATION_METHODS = ("pearson", "dtw")
GROUPING_RULES = ("two_means", "threshold")


def component_correlations(windows: np.ndarray, components: np.ndarray, method: str = "pearson") -> np.ndarray:
    """Mean over windows of each component's relation to its window, [K] in [0, 1].

    Args:
        windows: [N, W] the series windows.
        components: [N, K, W] their decompositions (IMFs, residue).
        method: "pearson": |Pearson correlation|; "dtw": 1 / (1 + DTW distance / W) of the z-normalised
            component and window (absolute differences, no warping window).
            A constant component (zero padding) or window scores 0 for that window.
    """
    windows = np.asarray(windows, dtype=np.float64)
    components = np.asarray(components, dtype=np.float64)
    if method not in CORRELATION_METHODS:
        raise ValueError(f"correlation method {method!r} is not one of {', '.join(CORRELATION_METHODS)}")
    if windows.ndim != 2 or components.ndim != 3 or components.shape[::2] != windows.shape:
        raise ValueError(f"need windows [N, W] and components [N, K, W], got {windows.shape} and {components.shape}")
    if not len(windows):
        raise ValueError("need at least one window to correlate components with")
    series, parts = _standardised(windows[:, None, :]), _standardised(components)
    constant = ~(np.isfinite(series).all(axis=-1) & np.isfinite(parts).all(axis=-1))  # [N, K]
    if method == "pearson":
        scores = np.abs(np.mean(series * parts, axis=-1))
    else:
        width = windows.shape[1]
        pairs = np.broadcast_to(series, parts.shape).reshape(-1, width)
        scores = (1.0 / (1.0 + dtw_distance(np.nan_to_num(pairs), np.nan_to_num(parts.reshape(-1, width))) / width))
        scores = scores.reshape(parts.shape[:2])
    return np.where(constant, 0.0, scores).mean(axis=0)


def _standardised(x: np.ndarray) -> np.ndarray:
    """(x - mean) / std along the last axis; NaN where the std is 0 (a constant row)."""
    centred = x - x.mean(axis=-1, keepdims=True)
    std = np.sqrt(np.mean(centred * centred, axis=-1, keepdims=True))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(std > 1e-12 * (np.abs(x).max(axis=-1, keepdims=True) + 1e-300), centred / std, np.nan)


def dtw_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dynamic-time-warping distance (sum of |a_i - b_j| along the best path) of each row pair, [P].

    a, b: [P, W]. The accumulated-cost matrix is filled one anti-diagonal at a time, every pair at once:
    O(W^2) work in 2W numpy steps, O(P W) memory.
    """
    pairs, width = a.shape
    # diagonals indexed by i; before[i] = D[i, s-1-i], two_before[i] = D[i, s-2-i] (1-based D, D[0, 0] = 0)
    two_before = np.full((pairs, width + 1), np.inf)
    two_before[:, 0] = 0.0  # diagonal s = 0: D[0, 0]
    before = np.full((pairs, width + 1), np.inf)  # diagonal s = 1: D[0, 1], D[1, 0] on the border
    i = np.arange(width + 1)
    for s in range(2, 2 * width + 1):
        rows = i[max(1, s - width):min(width, s - 1) + 1]
        current = np.full((pairs, width + 1), np.inf)
        best = np.minimum(np.minimum(before[:, rows - 1], before[:, rows]), two_before[:, rows - 1])
        current[:, rows] = np.abs(a[:, rows - 1] - b[:, s - rows - 1]) + best  # |a_i - b_j|, j = s - i
        two_before, before = before, current
    return before[:, width]


def group_components(correlations: np.ndarray, *, rule: str = "two_means",
                     threshold: float = 0.5) -> tuple[list[int], list[int]]:
    """Splits components into auxiliary targets (closely related) and input views (loosely related).

    Rules:
        two_means: the 1-D 2-means split of the correlations (the cut of the sorted values with the least
            within-group sum of squares, every cut tried; among equal sums the cut with fewer aux components);
            the high group is aux.
        threshold: correlation >= threshold is aux.
    With K >= 2 components each group gets at least one: when the threshold puts all in one group, the
    highest-correlated component becomes the only aux target (all above) or the lowest the only view (all
    below). With K = 1 the single component is an aux target; NaN correlations count as 0.

    Returns:
        (aux, views): component indices, each ascending.
    """
    values = np.nan_to_num(np.asarray(correlations, dtype=np.float64).ravel(), nan=0.0)
    if rule not in GROUPING_RULES:
        raise ValueError(f"grouping rule {rule!r} is not one of {', '.join(GROUPING_RULES)}")
    count = len(values)
    if count < 2:
        return list(range(count)), []
    order = np.argsort(-values, kind="stable")  # descending; ties keep component order
    if rule == "threshold":
        aux_count = int(np.count_nonzero(values >= threshold))
        aux_count = min(max(aux_count, 1), count - 1)
    else:
        ranked = values[order]
        costs = [_sum_of_squares(ranked[:cut]) + _sum_of_squares(ranked[cut:]) for cut in range(1, count)]
        aux_count = 1 + int(np.argmin(costs))  # argmin: first (fewest aux) among equal costs
    return sorted(order[:aux_count].tolist()), sorted(order[aux_count:].tolist())


def _sum_of_squares(values: np.ndarray) -> float:
    return float(np.sum((values - values.mean()) ** 2))
