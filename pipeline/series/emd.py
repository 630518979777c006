"""Batched EMD: the sifting of many rows at once as numpy array operations (the kernel of pipeline/series/eemd.py).

`batched_emd` is a re-implementation of PyEMD's `EMD.emd` (1.x, default settings: "simple" extrema, cubic
splines, two mirrored extrema per edge, its stopping thresholds), row-vectorised: extrema from sign changes
of the first difference (PyEMD's plateau rule included), PyEMD's edge mirroring, cubic-spline envelopes by a
batched tridiagonal (Thomas) solve for the knot slopes (not-a-knot ends as scipy's `CubicSpline`, natural ends
for three knots as PyEMD's `cubic_spline_3pts`), and PyEMD's per-row stopping tests as masks. Rows finish at
different sifting iterations; finished rows leave the arrays, so no row depends on the others and a window's
result does not depend on the batch it is in.
"""

from __future__ import annotations

import numpy as np

# PyEMD 1.x `EMD()` defaults, so that sifting stops where PyEMD's does.
NBSYM = 2  # extrema mirrored beyond each edge
MAX_ITERATION = 1000  # siftings per IMF at most (PyEMD stops at n >= MAX_ITERATION, i.e. after 999)
SVAR_THR = 0.001  # scaled variance of the change between siftings
STD_THR = 0.2  # sum of squared relative changes
ENERGY_RATIO_THR = 0.2  # energy of the change / energy of the previous proto-IMF
TOTAL_POWER_THR = 0.005  # decomposition ends when sum |residue| falls below (absolute, as PyEMD)
RANGE_THR = 0.001  # ... or max - min of the residue does (absolute, as PyEMD)


# ---------------------------------------------------------------- extrema


def find_extrema(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyEMD's "simple" extrema and zero crossings of every row of `x` [rows, W].

    Returns:
        is_max, is_min: [rows, W] bool, local maxima / minima (strict, or the middle of a flat top/bottom).
        crossings: [rows] int, zero crossings (strict sign changes plus runs of exact zeros).
    """
    d = np.diff(x, axis=1)
    before, after = d[:, :-1], d[:, 1:]
    turn = before * after < 0
    is_max = np.zeros(x.shape, dtype=bool)
    is_min = np.zeros(x.shape, dtype=bool)
    is_max[:, 1:-1] = turn & (before > 0)
    is_min[:, 1:-1] = turn & (before < 0)
    flat = d == 0
    if flat.any():
        _add_plateau_extrema(d, flat, is_max, is_min)
    crossings = np.count_nonzero(x[:, :-1] * x[:, 1:] < 0, axis=1)
    zero = x == 0
    if zero.any():  # each run of exact zeros counts once
        crossings += np.count_nonzero(zero[:, 1:] & ~zero[:, :-1], axis=1) + zero[:, 0]
    return is_max, is_min, crossings


def _add_plateau_extrema(d: np.ndarray, flat: np.ndarray, is_max: np.ndarray, is_min: np.ndarray) -> None:
    """Marks the middle of each flat run that rises before and falls after (max) or the reverse (min).

    Follows PyEMD's `_find_extrema_simple` exactly, quirks included (it is what the comparison is against):
    a run starting at the second sample or ending at the last one is ignored, and a run starting at the
    first sample looks "before" at the last difference.
    """
    width = flat.shape[1]
    edges = np.diff(np.pad(flat.astype(np.int8), ((0, 0), (1, 1))), axis=1)
    row, start = np.nonzero(edges == 1)
    _, stop = np.nonzero(edges == -1)  # same rows, same order: the n-th start pairs with the n-th stop
    kept = (start != 1) & (stop != width)
    row, start, stop = row[kept], start[kept], stop[kept]
    rising_before = d[row, start - 1]  # start 0 reads d[:, -1], as PyEMD's d[debs - 1] does
    rising_after = d[row, stop]
    middle = np.round((start + stop) / 2.0).astype(np.intp)
    top = (rising_before > 0) & (rising_after < 0)
    bottom = (rising_before < 0) & (rising_after > 0)
    is_max[row[top], middle[top]] = True
    is_min[row[bottom], middle[bottom]] = True


def _positions(mask: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Column indices of the True entries of each row, ascending, as [rows, width] (padded with 0), and counts."""
    row, col = np.nonzero(mask)
    count = np.bincount(row, minlength=len(mask))
    rank = np.arange(len(row)) - np.repeat(np.cumsum(count) - count, count)
    positions = np.zeros((len(mask), width), dtype=np.intp)
    positions[row, rank] = col
    return positions, count


# ---------------------------------------------------------------- edge mirroring (PyEMD prepare_points_simple)


def _slice(head: np.ndarray, count: np.ndarray, start: np.ndarray, stop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """head[:, start:stop] clipped to the row's count, as [rows, NBSYM] sources and validity."""
    rank = start[:, None] + np.arange(NBSYM)
    valid = (rank >= 0) & (rank < np.minimum(stop, count)[:, None])
    return np.take_along_axis(head, np.clip(rank, 0, head.shape[1] - 1), axis=1), valid


def _left_mirror(edge: np.ndarray, head_max: np.ndarray, n_max: np.ndarray, first_max_value: np.ndarray,
                 head_min: np.ndarray, n_min: np.ndarray, first_min_value: np.ndarray) -> tuple[np.ndarray, ...]:
    """Which extrema PyEMD mirrors beyond the left edge, and about which point.

    Args:
        edge: [rows] the first sample; head_*: [rows, NBSYM + 1] the first maxima / minima positions,
        n_*: their counts (>= 1); first_*_value: the signal at the first maximum / minimum.

    Returns:
        max_src, max_valid, min_src, min_valid: [rows, NBSYM + 1] source indices of the mirrored extrema
        (the last column is the edge sample itself, index 0) and which are used; sym: [rows] the
        mirror point. A mirrored knot lies at 2 * sym - src and takes the signal's value at src.
    """
    first_is_max = head_max[:, 0] < head_min[:, 0]
    # Mirror about the first extremum when the edge sample lies beyond the first opposite extremum,
    # else about the edge sample (which then joins the opposite envelope).
    about_max = first_is_max & (edge > first_min_value)
    about_edge_max = first_is_max & ~about_max  # the edge sample joins the minima
    about_min = ~first_is_max & (edge < first_max_value)
    about_edge_min = ~first_is_max & ~about_min  # the edge sample joins the maxima
    sym = np.where(about_max, head_max[:, 0], np.where(about_min, head_min[:, 0], 0))

    def chosen(head, count, skip_first, edge_joins):
        start = skip_first.astype(np.intp)
        stop = np.where(skip_first, NBSYM + 1, np.where(edge_joins, NBSYM - 1, NBSYM))
        # PyEMD: an empty choice falls back to all extrema of the kind (only ever a single one)
        empty = (np.minimum(stop, count) <= start) & ~edge_joins
        return np.where(empty, 0, start), np.where(empty, count, stop)

    max_start, max_stop = chosen(head_max, n_max, about_max, about_edge_min)
    min_start, min_stop = chosen(head_min, n_min, about_min, about_edge_max)

    def sources(start_max, stop_max, edge_max, start_min, stop_min, edge_min):
        src_max, ok_max = _slice(head_max, n_max, start_max, stop_max)
        src_min, ok_min = _slice(head_min, n_min, start_min, stop_min)
        zero = np.zeros((len(edge), 1), dtype=np.intp)
        return (np.hstack([src_max, zero]), np.hstack([ok_max, edge_max[:, None]]),
                np.hstack([src_min, zero]), np.hstack([ok_min, edge_min[:, None]]))

    max_src, max_valid, min_src, min_valid = sources(max_start, max_stop, about_edge_min, min_start, min_stop,
                                                     about_edge_max)
    # A mirrored set that does not reach past the edge is mirrored about the edge instead.
    beyond = np.iinfo(np.intp).max
    fix = ((np.where(max_valid, 2 * sym[:, None] - max_src, beyond).min(axis=1) > 0)
           | (np.where(min_valid, 2 * sym[:, None] - min_src, beyond).min(axis=1) > 0))
    if fix.any():
        fix_max = fix & (sym == head_max[:, 0])
        fix_min = fix & ~fix_max
        max_start, max_stop = np.where(fix_max, 0, max_start), np.where(fix_max, NBSYM, max_stop)
        min_start, min_stop = np.where(fix_min, 0, min_start), np.where(fix_min, NBSYM, min_stop)
        sym = np.where(fix, 0, sym)
        max_src, max_valid, min_src, min_valid = sources(max_start, max_stop, about_edge_min & ~fix_max, min_start,
                                                         min_stop, about_edge_max & ~fix_min)
    return max_src, max_valid, min_src, min_valid, sym


def _mirrored_knots(x: np.ndarray, pos_max: np.ndarray, n_max: np.ndarray, pos_min: np.ndarray,
                    n_min: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Knot positions, sources and validity of the max and min envelopes of each row, stacked as [2 * rows, K]."""
    rows, width = x.shape
    row = np.arange(rows)
    head = np.arange(NBSYM + 1)
    # Left edge as is; the right edge is the left edge of the time-reversed row (PyEMD's rules are symmetric).
    left = _left_mirror(x[:, 0], pos_max[:, :NBSYM + 1], n_max, x[row, pos_max[:, 0]],
                        pos_min[:, :NBSYM + 1], n_min, x[row, pos_min[:, 0]])
    last_max = np.take_along_axis(pos_max, np.clip(n_max[:, None] - 1 - head, 0, None), axis=1)
    last_min = np.take_along_axis(pos_min, np.clip(n_min[:, None] - 1 - head, 0, None), axis=1)
    right = _left_mirror(x[:, -1], width - 1 - last_max, n_max, x[row, last_max[:, 0]],
                         width - 1 - last_min, n_min, x[row, last_min[:, 0]])
    columns = np.arange(pos_max.shape[1])
    envelopes = []
    for kind, (positions, count) in enumerate(((pos_max, n_max), (pos_min, n_min))):
        left_src, left_ok = left[2 * kind], left[2 * kind + 1]
        right_src, right_ok = right[2 * kind], right[2 * kind + 1]
        source = np.hstack([left_src, positions, width - 1 - right_src])
        position = np.hstack([2 * left[4][:, None] - left_src, positions,
                              width - 1 - (2 * right[4][:, None] - right_src)])
        valid = np.hstack([left_ok, columns < count[:, None], right_ok])
        envelopes.append((position, source, valid))
    position_rows, source_rows, valid_rows = (np.vstack(parts) for parts in zip(*envelopes, strict=True))
    return position_rows, source_rows, valid_rows


# ---------------------------------------------------------------- cubic-spline envelopes


def _spline_slopes(xk: np.ndarray, yk: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Knot slopes of the cubic spline through each row's first n[r] knots, [rows, K] (0 beyond n).

    Not-a-knot ends for n >= 4 (scipy `CubicSpline`, which PyEMD uses), natural ends for n <= 3 (PyEMD's
    `cubic_spline_3pts`; n = 2 gives the straight line). Tridiagonal in the slopes, solved by the Thomas
    algorithm; the not-a-knot rows are not diagonally dominant, but their elimination pivots stay positive.
    """
    rows, knots = xk.shape
    h = np.diff(xk, axis=1)
    delta = np.diff(yk, axis=1) / h
    sub, diag = np.zeros((rows, knots)), np.ones((rows, knots))
    sup, rhs = np.zeros((rows, knots)), np.zeros((rows, knots))
    # interior rows i = 1..n-2: h_i k_{i-1} + 2 (h_{i-1} + h_i) k_i + h_{i-1} k_{i+1} = 3 (h_i d_{i-1} + h_{i-1} d_i)
    interior = np.arange(1, knots - 1)[None, :] <= (n - 2)[:, None]
    h_before, h_after = h[:, :-1], h[:, 1:]
    sub[:, 1:-1] = np.where(interior, h_after, 0.0)
    diag[:, 1:-1] = np.where(interior, 2.0 * (h_before + h_after), 1.0)
    sup[:, 1:-1] = np.where(interior, h_before, 0.0)
    rhs[:, 1:-1] = np.where(interior, 3.0 * (h_after * delta[:, :-1] + h_before * delta[:, 1:]), 0.0)
    not_a_knot = n >= 4
    with np.errstate(divide="ignore", invalid="ignore"):  # unused branches of np.where may divide by padding
        span = h[:, 0] + h[:, 1]
        diag[:, 0] = np.where(not_a_knot, h[:, 1], 2.0)
        sup[:, 0] = np.where(not_a_knot, span, 1.0)
        rhs[:, 0] = np.where(not_a_knot, ((h[:, 0] + 2 * span) * h[:, 1] * delta[:, 0] + h[:, 0] ** 2 * delta[:, 1])
                             / span, 3.0 * delta[:, 0])
        row, last = np.arange(rows), n - 1
        h_last, h_prev = h[row, last - 1], h[row, np.maximum(last - 2, 0)]
        d_last, d_prev = delta[row, last - 1], delta[row, np.maximum(last - 2, 0)]
        span = h_last + h_prev
        sub[row, last] = np.where(not_a_knot, span, 1.0)
        diag[row, last] = np.where(not_a_knot, h_prev, 2.0)
        sup[row, last] = 0.0
        rhs[row, last] = np.where(not_a_knot, (h_last ** 2 * d_prev + (2 * span + h_last) * h_prev * d_last) / span,
                                  3.0 * d_last)
    # Thomas algorithm over knot columns, all rows at once (columns made contiguous first).
    sub, diag, sup, rhs = sub.T.copy(), diag.T.copy(), sup.T.copy(), rhs.T.copy()
    for i in range(1, knots):
        factor = sub[i] / diag[i - 1]
        diag[i] -= factor * sup[i - 1]
        rhs[i] -= factor * rhs[i - 1]
    slopes = np.empty_like(rhs)
    slopes[-1] = rhs[-1] / diag[-1]
    for i in range(knots - 2, -1, -1):
        slopes[i] = (rhs[i] - sup[i] * slopes[i + 1]) / diag[i]
    return slopes.T


def _spline_values(xk: np.ndarray, yk: np.ndarray, slopes: np.ndarray, n: np.ndarray, width: int) -> np.ndarray:
    """The splines evaluated at 0..width-1, [rows, width]; knots are integers and span [0, width - 1]."""
    rows, knots = xk.shape
    used = np.arange(knots)[None, :] < n[:, None]
    inside = used & (xk >= 0) & (xk <= width - 1)
    # interval of t = (number of knots <= t) - 1, counted with a cumulative sum over marked knot positions
    marks = np.zeros((rows, width), dtype=np.int32)
    row, col = np.nonzero(inside)
    marks[row, xk[row, col].astype(np.intp)] = 1
    before = np.count_nonzero(used & (xk < 0), axis=1)
    interval = np.clip(np.cumsum(marks, axis=1) + (before - 1)[:, None], 0, (n - 2)[:, None])
    interval += (np.arange(rows) * (knots - 1))[:, None]  # flat index into the [rows, knots - 1] tables
    # per-interval polynomial in u = t - x_j, coefficients as scipy's CubicSpline computes them
    h = np.diff(xk, axis=1)
    k0, k1 = slopes[:, :-1], slopes[:, 1:]
    slope = np.diff(yk, axis=1) / h
    bend = (k0 + k1 - 2.0 * slope) / h
    u = np.arange(width)[None, :] - np.take(xk[:, :-1], interval)
    c3, c2 = np.take(bend / h, interval), np.take((slope - k0) / h - bend, interval)
    return ((c3 * u + c2) * u + np.take(k0, interval)) * u + np.take(yk[:, :-1], interval)


def envelope_mean(x: np.ndarray, is_max: np.ndarray, is_min: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the upper and lower cubic-spline envelopes of each row (PyEMD's `extract_max_min_spline`).

    Rows need at least one maximum and one minimum and three extrema in all.

    Returns:
        mean: [rows, W]; signs_ok: [rows] bool, no knot of the upper envelope below zero and none of the
        lower one above (PyEMD's first IMF test).
    """
    rows, width = x.shape
    n_max, n_min = is_max.sum(axis=1), is_min.sum(axis=1)
    columns = max(int(n_max.max()), int(n_min.max()), NBSYM + 1)
    pos_max, _ = _positions(is_max, columns)
    pos_min, _ = _positions(is_min, columns)
    position, source, valid = _mirrored_knots(x, pos_max, n_max, pos_min, n_min)
    key = np.where(valid, position, np.inf)
    order = np.argsort(key, axis=1, kind="stable")
    key, source = np.take_along_axis(key, order, axis=1), np.take_along_axis(source, order, axis=1)
    repeated = (key[:, 1:] == key[:, :-1]) & np.isfinite(key[:, 1:])
    if repeated.any():  # PyEMD drops the first of two knots at the same position
        key[:, :-1][repeated] = np.inf
        order = np.argsort(key, axis=1, kind="stable")
        key, source = np.take_along_axis(key, order, axis=1), np.take_along_axis(source, order, axis=1)
    n = np.count_nonzero(np.isfinite(key), axis=1)
    knots = max(int(n.max()), 3)  # the end rows read two intervals
    key, source = key[:, :knots], source[:, :knots]
    yk = np.take(x, source + (np.arange(2 * rows) % rows * width)[:, None])  # both envelopes read the same rows
    # padding beyond a row's knots: unit steps after its last knot, same value (keeps h > 0, no NaN)
    used = np.arange(knots)[None, :] < n[:, None]
    last = np.arange(len(n)), n - 1
    xk = np.where(used, key, key[last][:, None] + np.arange(knots)[None, :] - (n - 1)[:, None])
    yk = np.where(used, yk, yk[last][:, None])
    envelopes = _spline_values(xk, yk, _spline_slopes(xk, yk, n), n, width)
    signs_ok = ~((used[:rows] & (yk[:rows] < 0)).any(axis=1) | (used[rows:] & (yk[rows:] > 0)).any(axis=1))
    return 0.5 * (envelopes[:rows] + envelopes[rows:]), signs_ok


# ---------------------------------------------------------------- EMD


def _imf_converged(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """PyEMD's `check_imf` after its sign test: any of scaled variance, std or energy ratio below threshold."""
    with np.errstate(divide="ignore", invalid="ignore"):
        change = new - old
        change_energy = np.sum(change * change, axis=1)
        scaled_variance = change_energy / (old.max(axis=1) - old.min(axis=1))
        relative = np.sum((change / new) ** 2, axis=1)
        energy_ratio = change_energy / np.sum(old * old, axis=1)
        return (np.sum(new * new, axis=1) >= 1e-10) & (
            (scaled_variance < SVAR_THR) | (relative < STD_THR) | (energy_ratio < ENERGY_RATIO_THR))


def _sift(residue: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sifts the next IMF out of every row of `residue`, each row stopping by PyEMD's criteria.

    Returns:
        imf: [rows, W]; accepted: [rows] bool, False where the row had at most two extrema (a trend: the
        decomposition of that row is over); extrema: [rows] extrema count of the final proto-IMF.
    """
    imf = residue.copy()
    accepted = np.zeros(len(imf), dtype=bool)
    extrema = np.zeros(len(imf), dtype=np.intp)
    active = np.arange(len(imf))
    is_max, is_min, _ = find_extrema(imf)
    for _iteration in range(1, MAX_ITERATION):
        n_max, n_min = is_max.sum(axis=1), is_min.sum(axis=1)
        extrema[active] = n_max + n_min
        # Two extrema or fewer: a trend. (Three or more of one kind only can come from PyEMD's plateau
        # rule at an edge, where PyEMD itself fails; it is treated as a trend too.)
        sifting = (n_max + n_min > 2) & (n_max > 0) & (n_min > 0)
        active, is_max, is_min = active[sifting], is_max[sifting], is_min[sifting]
        if not len(active):
            break
        old = imf[active]
        mean, signs_ok = envelope_mean(old, is_max, is_min)
        new = old - mean
        is_max, is_min, crossings = find_extrema(new)
        count = is_max.sum(axis=1) + is_min.sum(axis=1)
        imf[active], extrema[active] = new, count
        done = signs_ok & _imf_converged(new, old) & (np.abs(count - crossings) < 2)
        accepted[active[done]] = True
        active, is_max, is_min = active[~done], is_max[~done], is_min[~done]
    else:
        accepted[active] = True  # sifting limit reached: PyEMD keeps the proto-IMF as it is
    return imf, accepted, extrema


def batched_emd(signals: np.ndarray, max_imfs: int) -> tuple[np.ndarray, np.ndarray]:
    """PyEMD's `EMD().emd(signal, max_imf=max_imfs)` for every row of `signals` [rows, W] at once.

    Returns:
        imfs: [rows, max_imfs, W], zero beyond a row's count; the residue is signals - imfs.sum(1).
        counts: [rows] number of IMFs of each row.
    """
    signals = np.ascontiguousarray(signals, dtype=np.float64)
    rows, width = signals.shape
    imfs = np.zeros((rows, max_imfs, width))
    counts = np.zeros(rows, dtype=np.intp)
    alive = np.arange(rows)
    for k in range(max_imfs):
        if not len(alive):
            break
        imf, accepted, extrema = _sift(signals[alive] - imfs[alive, :k].sum(axis=1))
        alive, imf, extrema = alive[accepted], imf[accepted], extrema[accepted]
        imfs[alive, k] = imf
        counts[alive] = k + 1
        rest = signals[alive] - imfs[alive, :k + 1].sum(axis=1)
        finished = ((rest.max(axis=1) - rest.min(axis=1) < RANGE_THR) | (np.abs(rest).sum(axis=1) < TOTAL_POWER_THR)
                    | (k + 1 == max_imfs))
        # PyEMD: when the decomposition ends on a proto-IMF with at most two extrema, it joins the residue
        dropped = alive[finished & (extrema <= 2)]
        imfs[dropped, k] = 0.0
        counts[dropped] = k
        alive = alive[~finished]
    return imfs, counts


