"""Leakage-free self-boosted examples: inputs see x[..t] only, targets x[..t+h] only; grouping and
normalisation come from the training part; decompositions are cached and shared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamssl.pipeline.config import ConfigError
from streamssl.pipeline.series.eemd import RollingEEMD
from streamssl.pipeline.series.examples import Decomposition, build_examples, forecast_errors, rolling_components

SPEC = Decomposition(window=32, trials=4, max_imfs=3, processes=1)  # tiny: a real EEMD, fast enough for a unit test
LAG, HORIZON = 5, 3


def synthetic(points: int = 160, seed: int = 0) -> np.ndarray:
    t = np.arange(points)
    rng = np.random.default_rng(seed)
    return 5 + np.sin(2 * np.pi * t / 12) + 0.5 * np.sin(2 * np.pi * t / 5) + 0.2 * rng.standard_normal(points)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One decomposition cache for the module: each (series, spec) is decomposed once."""
    return tmp_path_factory.mktemp("eemd-cache")


@pytest.fixture(scope="module")
def series_pair() -> tuple[np.ndarray, np.ndarray, int]:
    """A series and a copy whose values after index `cut` (inside the test part) are different."""
    values = synthetic()
    cut = len(values) - 20
    changed = values.copy()
    changed[cut + 1:] += np.random.default_rng(1).normal(0, 2, len(values) - cut - 1)
    return values, changed, cut


def test_no_feature_or_target_sees_the_future(series_pair: tuple[np.ndarray, np.ndarray, int], cache: Path) -> None:
    values, changed, cut = series_pair
    before = build_examples(values, mode="combined", lag=LAG, horizon=HORIZON, spec=SPEC, cache_dir=cache)
    after = build_examples(changed, mode="combined", lag=LAG, horizon=HORIZON, spec=SPEC, cache_dir=cache)
    assert before.groups.aux and before.groups.views, "the test needs both aux targets and views"
    assert after.groups == before.groups  # decided on training windows, all before the cut
    origins = before.origins
    np.testing.assert_array_equal(after.input_mean, before.input_mean)  # statistics from training only
    np.testing.assert_array_equal(after.target_std, before.target_std)
    known_inputs = origins <= cut  # inputs of origin t use x[..t]
    np.testing.assert_array_equal(after.inputs[known_inputs], before.inputs[known_inputs])
    known_targets = origins + HORIZON <= cut  # targets of origin t use x[..t+h]
    np.testing.assert_array_equal(after.targets[known_targets], before.targets[known_targets])
    # not vacuous: the examples that do reach past the cut change, in the views and in the aux targets too
    assert not np.allclose(after.inputs[~known_inputs][:, 1:], before.inputs[~known_inputs][:, 1:])
    assert not np.allclose(after.targets[~known_targets][:, 1:], before.targets[~known_targets][:, 1:])


def test_whole_series_decomposition_would_leak(series_pair: tuple[np.ndarray, np.ndarray, int]) -> None:
    """Why the above exists: decomposing the whole series (the paper's reference code) moves component values
    BEFORE the cut when only values after it change, so past inputs and targets would carry the future."""
    values, changed, cut = series_pair
    eemd = RollingEEMD(method=SPEC.method, trials=SPEC.trials, noise_width=SPEC.noise_width, max_imfs=SPEC.max_imfs,
                       seed=SPEC.seed, processes=1)
    try:
        whole_before, whole_after = eemd.decompose(np.stack([values, changed]))
    finally:
        eemd.close()
    past = slice(cut - 10, cut + 1)  # the ten values up to and including the cut did not change
    np.testing.assert_array_equal(values[past], changed[past])
    assert np.abs(whole_after[:, past] - whole_before[:, past]).max() > 1e-3


@pytest.mark.parametrize(("mode", "decomposes"), [
    ("persistence", False), ("single", False), ("mtl", True), ("mtv", True), ("combined", True),
])
def test_example_shapes_per_mode(mode: str, decomposes: bool, cache: Path) -> None:
    values = synthetic()
    examples = build_examples(values, mode=mode, lag=LAG, horizon=HORIZON, spec=SPEC, cache_dir=cache)
    count = len(values) - HORIZON - (SPEC.window - 1)  # origins W-1 .. N-1-h, the same for every mode
    views = len(examples.groups.views) if mode in ("mtv", "combined") else 0
    aux = len(examples.groups.aux) if mode in ("mtl", "combined") else 0
    assert examples.inputs.shape == (count, 1 + views, LAG) and examples.inputs.dtype == np.float32
    assert examples.targets.shape == (count, 1 + aux)
    assert (examples.groups is not None) == decomposes
    assert examples.channels[0] == examples.target_names[0] == "series"
    # channel 0 holds the raw lags and column 0 the value h steps ahead, both in the same normalisation
    raw = examples.inputs[:, 0] * examples.input_std[0] + examples.input_mean[0]
    np.testing.assert_allclose(raw[:, -1], values[examples.origins], rtol=1e-5)
    np.testing.assert_allclose(examples.main_in_units(examples.targets[:, 0]), values[examples.origins + HORIZON],
                               rtol=1e-5)
    train, val, test = examples.train, examples.val, examples.test
    assert train.stop == val.start and val.stop == test.start and test.stop == count
    assert (test.stop - test.start) >= 0.19 * count  # the most recent fifth is the test set


def test_decompositions_are_cached_and_shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decomposed: list[int] = []
    original = RollingEEMD.decompose

    def counting(self: RollingEEMD, windows: np.ndarray) -> np.ndarray:
        decomposed.append(len(windows))
        return original(self, windows)

    monkeypatch.setattr(RollingEEMD, "decompose", counting)  # a spy: the real decomposition still runs
    values = synthetic()
    build_examples(values, mode="mtl", lag=LAG, horizon=HORIZON, spec=SPEC, cache_dir=tmp_path)
    assert sum(decomposed) == len(values) - SPEC.window + 1  # one window per time index, inputs and targets share
    for mode, lag in (("mtv", 2), ("combined", 7)):
        build_examples(values, mode=mode, lag=lag, horizon=1, spec=SPEC, cache_dir=tmp_path)
    assert sum(decomposed) == len(values) - SPEC.window + 1  # other modes, lags and horizons: no new work
    components, _ = rolling_components(values, np.array([40, 100]), SPEC, cache_dir=None)
    cached, _ = rolling_components(values, np.array([40, 100]), SPEC, cache_dir=tmp_path)
    np.testing.assert_array_equal(cached, components)


def test_threshold_grouping_and_stored_groups(cache: Path) -> None:
    values = synthetic()
    examples = build_examples(values, mode="combined", lag=LAG, horizon=1, spec=SPEC, grouping="threshold",
                              threshold=0.0, cache_dir=cache)
    # threshold 0: every component is at or above it, but each group keeps one: the least correlated is the view
    correlations = examples.groups.correlations
    assert examples.groups.views == [int(np.argmin(correlations))]
    assert examples.groups.aux == sorted(set(range(SPEC.max_imfs + 1)) - set(examples.groups.views))
    assert examples.inputs.shape[1] == 2 and examples.targets.shape[1] == SPEC.max_imfs + 1
    reused = build_examples(values, mode="combined", lag=LAG, horizon=1, spec=SPEC, groups=examples.groups,
                            cache_dir=cache)
    assert reused.groups is examples.groups


def test_forecast_errors_definition() -> None:
    targets = np.array([1.0, 3.0, 5.0, 7.0])
    errors = forecast_errors(targets + np.array([1.0, -1.0, 1.0, -1.0]), targets)
    assert errors["rmse"] == pytest.approx(1.0) and errors["mae"] == pytest.approx(1.0)
    assert errors["nrmse"] == pytest.approx(1.0 / np.std(targets))


def test_too_short_or_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="too short"):
        build_examples(synthetic(40), mode="single", lag=LAG, horizon=1, spec=SPEC)
    with pytest.raises(ConfigError, match="window >= lag"):
        build_examples(synthetic(), mode="single", lag=64, horizon=1, spec=SPEC)
    with pytest.raises(ConfigError, match="not one of"):
        build_examples(synthetic(), mode="boosted", lag=LAG, horizon=1, spec=SPEC)
