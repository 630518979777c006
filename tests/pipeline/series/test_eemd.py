"""Rolling EEMD: the batched EMD against PyEMD's EMD, reconstruction, per-window determinism, the pool."""

from __future__ import annotations

import numpy as np
import pytest
from PyEMD import EMD

from streamssl.pipeline.series.eemd import RollingEEMD, trailing_windows
from streamssl.pipeline.series.emd import batched_emd, find_extrema


def synthetic_windows(count: int, width: int, seed: int = 0) -> np.ndarray:
    """Sum of two sines (random frequencies, phases, amplitudes) plus a linear trend."""
    rng = np.random.default_rng(seed)
    t = np.arange(width)
    rows = []
    for _ in range(count):
        slow, fast = rng.uniform(0.015, 0.05), rng.uniform(0.12, 0.3)
        rows.append(rng.uniform(0.5, 2) * np.sin(2 * np.pi * slow * t + rng.uniform(0, 6))
                    + 0.5 * np.sin(2 * np.pi * fast * t + rng.uniform(0, 6)) + rng.uniform(-0.02, 0.02) * t)
    return np.array(rows)


def pyemd_imfs(signal: np.ndarray) -> np.ndarray:
    emd = EMD()
    emd.emd(signal)
    return emd.get_imfs_and_residue()[0]


def test_batched_emd_matches_pyemd_emd():
    smooth = synthetic_windows(12, 128)
    # integer rounding makes flat runs: PyEMD's plateau rule must be matched too
    stepped = np.round(synthetic_windows(6, 96, seed=1) * 3)
    for signals in (smooth, stepped):
        imfs, counts = batched_emd(signals, max_imfs=12)
        for row, signal in enumerate(signals):
            reference = pyemd_imfs(signal)
            assert counts[row] == len(reference) >= 2
            np.testing.assert_allclose(imfs[row, :counts[row]], reference, rtol=0, atol=1e-9)
            assert not imfs[row, counts[row]:].any()
    assert find_extrema(stepped)[0][:, 1:-1].any()  # the stepped rows do have extrema (sanity of the case)


def test_max_imfs_caps_like_pyemd():
    signal = synthetic_windows(1, 128, seed=3)
    imfs, counts = batched_emd(signal, max_imfs=1)
    emd = EMD()
    emd.emd(signal[0], max_imf=1)
    reference = emd.get_imfs_and_residue()[0]
    assert counts[0] == len(reference) == 1
    np.testing.assert_allclose(imfs[0, :1], reference, atol=1e-9)


def test_components_add_up_and_are_zero_padded():
    windows = synthetic_windows(6, 48, seed=2)
    with RollingEEMD(trials=6, max_imfs=6, processes=1) as eemd:
        components, counts = eemd.decompose(windows, return_counts=True)
        np.testing.assert_array_equal(eemd.imf_counts(windows), counts)
    assert components.shape == (6, 7, 48)
    np.testing.assert_allclose(components.sum(axis=1), windows, rtol=0, atol=1e-12)
    assert (counts >= 2).all() and (counts < 6).any()  # 48 points: fewer than 6 IMFs somewhere
    for components_of_window, count in zip(components, counts, strict=True):
        assert not components_of_window[count:6].any()  # IMF slots beyond the count stay zero
        assert np.abs(components_of_window[:count]).max(axis=1).min() > 0


def test_plain_emd_is_trials_one_without_noise():
    windows = synthetic_windows(3, 64, seed=4)
    with RollingEEMD(trials=1, noise_width=0.0, max_imfs=8, processes=1) as eemd:
        components, counts = eemd.decompose(windows, return_counts=True)
        line = np.linspace(0.0, 3.0, 64)[None]
        line_components, line_count = eemd.decompose(line, return_counts=True)
    assert line_count[0] == 0 and not line_components[0, :8].any()  # a line has no IMF: all of it is residue
    np.testing.assert_array_equal(line_components[0, 8], line[0])
    for row, window in enumerate(windows):
        reference = pyemd_imfs(window)
        assert counts[row] == len(reference)
        np.testing.assert_allclose(components[row, :counts[row]], reference, atol=1e-9)


def test_same_window_alone_in_a_batch_or_reordered_gives_identical_components():
    windows = synthetic_windows(7, 64, seed=5) + np.random.default_rng(5).normal(0, 0.05, (7, 64))
    with RollingEEMD(trials=5, processes=1) as inline, RollingEEMD(trials=5, processes=2) as pooled:
        batch = inline.decompose(windows)
        alone = np.stack([inline.decompose(windows[i:i + 1])[0] for i in range(len(windows))])
        order = np.random.default_rng(0).permutation(len(windows))
        reordered = pooled.decompose(windows[order])[np.argsort(order)]
        np.testing.assert_array_equal(batch, alone)
        np.testing.assert_array_equal(batch, reordered)
        # the pool is started once and reused by every later call
        pool = pooled.pool
        assert pool is not None
        pooled.decompose(windows[:3])
        assert pooled.pool is pool
        pooled.close()
        assert pooled._pool is None
    with RollingEEMD(trials=5, processes=1, seed=1) as other_seed:
        assert not np.allclose(other_seed.decompose(windows[:2]), batch[:2])


def test_batched_backend_matches_pyemd_backend_on_the_same_noise():
    windows = synthetic_windows(3, 64, seed=6)
    kwargs = {"trials": 4, "max_imfs": 3, "processes": 1, "seed": 7}
    with RollingEEMD(backend="batched", **kwargs) as ours, RollingEEMD(backend="pyemd", **kwargs) as reference:
        ours_components, ours_counts = ours.decompose(windows, return_counts=True)
        reference_components, reference_counts = reference.decompose(windows, return_counts=True)
    np.testing.assert_array_equal(ours_counts, reference_counts)
    np.testing.assert_allclose(ours_components, reference_components, atol=1e-9)


def test_ceemdan_runs_through_pyemd():
    windows = synthetic_windows(2, 32, seed=8)
    with RollingEEMD(method="ceemdan", trials=3, max_imfs=3, processes=1) as eemd:
        assert eemd.backend == "pyemd"
        components, counts = eemd.decompose(windows, return_counts=True)
        again = eemd.decompose(windows[::-1])[::-1]
    assert components.shape == (2, 4, 32) and (counts >= 1).all()
    np.testing.assert_allclose(components.sum(axis=1), windows, atol=1e-12)
    np.testing.assert_array_equal(components, again)


def test_trailing_windows_end_at_each_index():
    series = np.arange(20.0)
    windows = trailing_windows(series, 5, np.array([4, 10, 19]))
    np.testing.assert_array_equal(windows, [[0, 1, 2, 3, 4], [6, 7, 8, 9, 10], [15, 16, 17, 18, 19]])
    assert windows.flags.c_contiguous and windows.dtype == np.float64
    assert trailing_windows(series, 5, np.zeros(0, dtype=np.int64)).shape == (0, 5)
    for ends in (np.array([3]), np.array([20]), np.array([4.0])):
        with pytest.raises(ValueError):
            trailing_windows(series, 5, ends)


def test_bad_settings_and_windows_raise():
    for kwargs in ({"method": "vmd"}, {"backend": "gpu"}, {"method": "ceemdan", "backend": "batched"},
                   {"trials": 0}, {"noise_width": -1.0}):
        with pytest.raises(ValueError):
            RollingEEMD(**kwargs)
    eemd = RollingEEMD(trials=2, processes=1)
    for windows in (np.zeros(10), np.zeros((2, 2)), np.array([[0.0, np.nan, 1.0, 2.0]])):
        with pytest.raises(ValueError):
            eemd.decompose(windows)
    assert eemd.decompose(np.zeros((0, 16))).shape == (0, 5, 16)
