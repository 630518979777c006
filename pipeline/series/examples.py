"""Leakage-free forecasting examples for the self-boosted forecaster (Nguyen et al. 2019, arXiv:1909.08181).

The paper's reference code decomposes the WHOLE series with EEMD and only then splits it into train and
test. EEMD is not causal (cubic-spline envelopes, end effects): the component values at time t then
depend on values after t, so the "past" inputs and the auxiliary targets carry information from the
future. Here every component value is computed from a trailing window that ends at the time it is used:

For a forecast origin t (index of the last observed value), lag L, horizon h and window W >= L:
* inputs, channel 0: the series x[t-L+1..t];
* inputs, channels 1.. (mtv / combined): the last L values of each VIEW component of the decomposition
  of x[t-W+1..t];
* main target: x[t+h];
* auxiliary targets (mtl / combined): each AUX component's last value in the decomposition of
  x[t+h-W+1..t+h], i.e. the component "at the target time" computed from the past up to it.

So an example's inputs depend on x[..t] only and its targets on x[..t+h] only (tests/pipeline/series/test_examples.py
changes later values and checks nothing moves). Each time index e is decomposed once (the trailing window
ending at e) and shared by the inputs of origin e and the auxiliary targets of origin e-h. Decompositions
are cached on disk per (series contents, window, decomposition parameters, backend), so a comparison over
lags x modes x seeds decomposes each series once.

Origins run from W-1 (the first full window) to N-1-h for every mode, so all modes are scored on the same
test points. They are split in time order: train (first 70%), validation (next 10%), test (the most recent
20%). What is decided from data is decided on the training part only: the grouping of components into
auxiliary targets and views (correlation of each component with the series over the training windows),
and the z-score normalisation (mean/std of the series over the training period for channel 0 and the main
target, which share them so persistence stays "the last input"; per channel / per target over training
examples for the components).

Error metric: nRMSE = RMSE / standard deviation of the test targets, both in the series' units (a
scale-free RMSE: 1.0 is as bad as forecasting the test mean; persistence on a smooth series is far
below 1). The paper's tables report errors of de-normalised forecasts; its reference code computes plain
RMSE, which is reported here as well (`rmse`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from streamssl.pipeline.config import ConfigError
from streamssl.pipeline.series.eemd import RollingEEMD, trailing_windows
from streamssl.pipeline.series.grouping import component_correlations, group_components
from streamssl.streams.files import atomic_write

log = logging.getLogger(__name__)

MODES = ("persistence", "single", "mtl", "mtv", "combined")
USES_AUX = ("mtl", "combined")
USES_VIEWS = ("mtv", "combined")
NRMSE_DEFINITION = "rmse / std(test targets), in the series' units"
CHUNK_WINDOWS = 512  # windows decomposed between cache saves: an interrupted decomposition keeps most of its work


@dataclass(frozen=True)
class Decomposition:
    """How each trailing window is decomposed (see `streamssl.pipeline.series.eemd.RollingEEMD`)."""

    window: int = 128
    method: str = "eemd"  # eemd | ceemdan
    trials: int = 50
    noise_width: float = 0.05
    max_imfs: int = 4
    seed: int = 0  # fixed across training seeds on purpose: one decomposition serves every run of a series
    backend: str = "auto"
    processes: int = 0

    def component_names(self) -> list[str]:
        return [f"imf{k + 1}" for k in range(self.max_imfs)] + ["residue"]


@dataclass
class Groups:
    """Which components are auxiliary targets and which are input views; decided on training windows."""

    aux: list[int]
    views: list[int]
    correlations: list[float]
    rule: str
    threshold: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ForecastExamples:
    """All examples of one series, normalised, in time order, with their split and statistics."""

    inputs: np.ndarray  # [N, C, L] float32, z-scored per channel
    targets: np.ndarray  # [N, 1 + A] float32, z-scored per target; column 0 = x[t+h]
    origins: np.ndarray  # [N] int64: t, the index of each example's last observed value
    train: slice
    val: slice
    test: slice
    input_mean: np.ndarray  # [C] float64
    input_std: np.ndarray
    target_mean: np.ndarray  # [1 + A] float64; column 0 equals channel 0's statistics
    target_std: np.ndarray
    channels: list[str]
    target_names: list[str]
    groups: Groups | None = None
    decomposition_seconds: float = 0.0
    decomposition_backend: str = ""  # what RollingEEMD's backend resolved to ("" = not decomposed)

    def main_in_units(self, normalised: np.ndarray) -> np.ndarray:
        """Main-target values (forecasts or targets) back in the series' units."""
        return np.asarray(normalised, dtype=np.float64) * self.target_std[0] + self.target_mean[0]

    def normalisation(self) -> dict:
        return {"input_mean": self.input_mean.tolist(), "input_std": self.input_std.tolist(),
                "target_mean": self.target_mean.tolist(), "target_std": self.target_std.tolist()}


def default_cache_dir() -> Path:
    """~/.cache/streamssl/eemd (or under $XDG_CACHE_HOME)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "streamssl" / "eemd"


def series_fingerprint(values: np.ndarray) -> str:
    """sha256 of the series' float64 bytes: identifies the data a run or a cache entry was built from."""
    return hashlib.sha256(np.ascontiguousarray(values, dtype=np.float64).tobytes()).hexdigest()


def rolling_components(values: np.ndarray, ends: np.ndarray, spec: Decomposition,
                       cache_dir: Path | None = None) -> tuple[np.ndarray, str]:
    """Decomposition of the trailing window x[e-W+1..e] for every e in `ends`: [len(ends), max_imfs + 1, W] float32,
    and the name of the backend that computed it (what `backend="auto"` resolved to).

    Cached in `cache_dir` (None = no disk cache) per (series contents, spec, resolved backend): windows
    decomposed before are read back, only the missing ones are computed. The cache holds results of
    whole trailing windows only, and a window's decomposition depends only on its contents and the seed,
    so a cached value can never carry information from later in the series.
    """
    values = np.ascontiguousarray(values, dtype=np.float64)
    ends = np.asarray(ends, dtype=np.int64)
    if len(ends) and (ends.min() < spec.window - 1 or ends.max() >= len(values)):
        raise ValueError(f"window ends must lie in [{spec.window - 1}, {len(values) - 1}]")
    eemd = RollingEEMD(method=spec.method, trials=spec.trials, noise_width=spec.noise_width, max_imfs=spec.max_imfs,
                       processes=spec.processes, seed=spec.seed, backend=spec.backend)
    try:
        backend = str(getattr(eemd, "backend", spec.backend))
        params = {**asdict(spec), "backend": backend, "processes": None}  # processes do not change results
        key = hashlib.sha256((series_fingerprint(values) + json.dumps(params, sort_keys=True)).encode()).hexdigest()[:32]
        path = Path(cache_dir) / f"{key}.npz" if cache_dir is not None else None
        known_ends, known = _read_cache(path, spec)
        missing = np.setdiff1d(ends, known_ends)
        if len(missing):
            log.info("decomposing %d trailing windows of %d points (%s, %d trials, backend %s)", len(missing),
                     spec.window, spec.method, spec.trials, backend)
        started = time.monotonic()
        for first in range(0, len(missing), CHUNK_WINDOWS):
            chunk = missing[first:first + CHUNK_WINDOWS]
            parts = eemd.decompose(trailing_windows(values, spec.window, chunk)).astype(np.float32)
            known_ends = np.concatenate([known_ends, chunk])
            known = np.concatenate([known, parts])
            order = np.argsort(known_ends, kind="stable")
            known_ends, known = known_ends[order], known[order]
            if path is not None:
                _write_cache(path, known_ends, known)
            done = first + len(chunk)
            log.info("decomposed %d/%d windows (%.1f windows/s)", done, len(missing),
                     done / max(time.monotonic() - started, 1e-9))
    finally:
        eemd.close()
    return known[np.searchsorted(known_ends, ends)], backend


def _read_cache(path: Path | None, spec: Decomposition) -> tuple[np.ndarray, np.ndarray]:
    empty = (np.zeros(0, np.int64), np.zeros((0, spec.max_imfs + 1, spec.window), np.float32))
    if path is None or not path.is_file():
        return empty
    try:
        with np.load(path) as stored:
            ends, components = stored["ends"].astype(np.int64), stored["components"].astype(np.float32)
    except (OSError, ValueError, KeyError) as err:  # a truncated or foreign file: recompute, never trust it
        log.warning("ignoring unreadable decomposition cache %s (%s)", path, type(err).__name__)
        return empty
    if components.shape[1:] != empty[1].shape[1:] or len(ends) != len(components):
        log.warning("ignoring decomposition cache %s with unexpected shape %s", path, components.shape)
        return empty
    return ends, components


def _write_cache(path: Path, ends: np.ndarray, components: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # a cache: it may be lost in a crash (and is then recomputed), but a reader never sees half of one
    with atomic_write(path, durable=False) as handle:  # a file object: numpy appends no .npz suffix
        np.savez(handle, ends=ends, components=components)


def split_bounds(count: int, fractions: tuple[float, float] = (0.7, 0.1)) -> tuple[slice, slice, slice]:
    """Chronological train / validation / test slices of `count` examples (test = the rest, most recent)."""
    train_end = int(count * fractions[0])
    val_end = train_end + int(count * fractions[1])
    return slice(0, train_end), slice(train_end, val_end), slice(val_end, count)


def build_examples(values: np.ndarray, *, mode: str, lag: int, horizon: int, spec: Decomposition,
                   fractions: tuple[float, float] = (0.7, 0.1), grouping: str = "two_means", threshold: float = 0.5,
                   groups: Groups | None = None, cache_dir: Path | None = None) -> ForecastExamples:
    """Examples of one series for `mode` (see the module docstring for exactly what each holds).

    Args:
        values: the series, float, oldest first (already limited to the part to use).
        mode: persistence | single | mtl | mtv | combined; the last three need the decomposition.
        lag, horizon: L and h.
        spec: the decomposition (its `window` is W, W >= lag).
        fractions: train and validation shares of the origins; the test set is the rest.
        grouping, threshold: `group_components` rule for a fresh grouping.
        groups: a grouping decided before (a resumed run's), used instead of deciding again.
        cache_dir: decomposition cache folder (None = no disk cache).
    """
    values = np.asarray(values, dtype=np.float64)
    if mode not in MODES:
        raise ConfigError(f"forecast mode {mode!r} is not one of {', '.join(MODES)}")
    if lag < 1 or horizon < 1 or spec.window < lag:
        raise ConfigError(f"need lag >= 1, horizon >= 1 and series.window >= lag; got lag {lag}, horizon {horizon}, "
                          f"window {spec.window}")
    origins = np.arange(spec.window - 1, len(values) - horizon, dtype=np.int64)
    train, val, test = split_bounds(len(origins), fractions)
    if min(train.stop - train.start, val.stop - val.start, test.stop - test.start) < 2:
        raise ConfigError(f"series of {len(values)} points is too short for window {spec.window} + horizon {horizon}: "
                          f"{len(origins)} forecast origins do not fill train / validation / test")
    raw = trailing_windows(values, lag, origins)[:, None, :]  # [N, 1, L]
    main = values[origins + horizon]
    # the training period ends at the last training target: statistics never see validation or test values
    train_period = values[:origins[train.stop - 1] + horizon + 1]
    series_mean, series_std = float(train_period.mean()), _safe_std(train_period.std())
    channels, target_names = ["series"], ["series"]
    view_inputs = np.zeros((len(origins), 0, lag))
    aux_targets = np.zeros((len(origins), 0))
    seconds, backend = 0.0, ""
    if mode in USES_AUX or mode in USES_VIEWS:
        started = time.monotonic()
        ends = np.arange(spec.window - 1, len(values), dtype=np.int64)  # every index any example needs
        components, backend = rolling_components(values, ends, spec, cache_dir)  # row e-(W-1): window ending at e
        seconds = time.monotonic() - started
        at = origins - (spec.window - 1)
        if groups is None:
            groups = decide_groups(trailing_windows(values, spec.window, origins[train]), components[at[train]],
                                   grouping, threshold)
        names = spec.component_names()
        if mode in USES_VIEWS:
            view_inputs = components[at][:, groups.views, spec.window - lag:]
            channels += [names[k] for k in groups.views]
        if mode in USES_AUX:
            aux_targets = components[at + horizon][:, groups.aux, -1]
            target_names += [names[k] for k in groups.aux]
        if (mode in USES_AUX and not groups.aux) or (mode in USES_VIEWS and not groups.views):
            log.warning("mode %s: grouping gave %d aux targets and %d views; the mode degenerates", mode,
                        len(groups.aux), len(groups.views))
    view_mean, view_std = _channel_stats(view_inputs[train], axes=(0, 2))
    aux_mean, aux_std = _channel_stats(aux_targets[train], axes=(0,))
    input_mean = np.concatenate([[series_mean], view_mean])
    input_std = np.concatenate([[series_std], view_std])
    target_mean = np.concatenate([[series_mean], aux_mean])
    target_std = np.concatenate([[series_std], aux_std])
    inputs = np.concatenate([raw, view_inputs], axis=1)
    targets = np.concatenate([main[:, None], aux_targets], axis=1)
    return ForecastExamples(
        inputs=((inputs - input_mean[None, :, None]) / input_std[None, :, None]).astype(np.float32),
        targets=((targets - target_mean) / target_std).astype(np.float32),
        origins=origins, train=train, val=val, test=test, input_mean=input_mean, input_std=input_std,
        target_mean=target_mean, target_std=target_std, channels=channels, target_names=target_names,
        groups=groups if mode in USES_AUX or mode in USES_VIEWS else None, decomposition_seconds=seconds,
        decomposition_backend=backend)


def decide_groups(windows: np.ndarray, components: np.ndarray, rule: str, threshold: float) -> Groups:
    """Correlates each component with its window's series over the training windows and splits them."""
    correlations = np.nan_to_num(np.asarray(component_correlations(windows, components.astype(np.float64)),
                                            dtype=np.float64))
    aux, views = group_components(correlations, rule=rule, threshold=threshold)
    groups = Groups(aux=sorted(int(k) for k in aux), views=sorted(int(k) for k in views),
                    correlations=[round(float(c), 4) for c in correlations], rule=rule, threshold=threshold)
    log.info("grouping on %d training windows: correlations %s -> aux %s, views %s", len(windows),
             groups.correlations, groups.aux, groups.views)
    return groups


def forecast_errors(forecasts: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """rmse, mae and nrmse (= rmse / std of the targets) of forecasts against targets, both in the series' units."""
    error = np.asarray(forecasts, dtype=np.float64) - np.asarray(targets, dtype=np.float64)
    rmse = float(np.sqrt(np.mean(error ** 2)))
    return {"nrmse": rmse / _safe_std(np.std(targets)), "rmse": rmse, "mae": float(np.mean(np.abs(error)))}


def _channel_stats(values: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (axis 1) mean and std over `axes`; zero channels (padding) keep std 1."""
    if values.shape[1] == 0:
        return np.zeros(0), np.ones(0)
    std = values.std(axis=axes)
    return values.mean(axis=axes), np.where(std > 1e-12, std, 1.0)


def _safe_std(std: float) -> float:
    return float(std) if std > 1e-12 else 1.0
