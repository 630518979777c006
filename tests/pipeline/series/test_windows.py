"""SeriesWindows: the rule for late, duplicate and non-finite points, per-series windows, exact state round trip."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from streamssl.monitoring.metrics import Metrics
from streamssl.pipeline.loading.deadletter import DeadLetters
from streamssl.pipeline.series.windows import SeriesWindows
from streamssl.streams.series_points import Point


def _point(timestamp: float, value: float, series: str = "a", index: int = 0) -> Point:
    return Point(series, timestamp, value, "file.parquet", index)


def test_windows_keep_the_last_points_of_each_series_in_time_order() -> None:
    windows = SeriesWindows(3)
    indices = [windows.add(_point(t, t * 2.0)) for t in range(5)]
    assert indices == [0, 1, 2, 3, 4]
    assert windows.add(_point(0.5, 7.0, series="b")) == 0  # series are independent: b's time is its own
    np.testing.assert_array_equal(windows.values("a"), [4.0, 6.0, 8.0])
    np.testing.assert_array_equal(windows.values("a", 2), [6.0, 8.0])
    assert windows.count("a") == 5 and windows.count("b") == 1 and windows.count("zzz") == 0
    assert windows.series_ids() == ["a", "b"]
    with pytest.raises(ValueError, match="holds 1 points"):
        windows.values("b", 2)


def test_late_duplicate_conflicting_and_non_finite_points_are_dead_lettered_by_reason(tmp_path: Path) -> None:
    metrics = Metrics("forecast")
    dead = DeadLetters(tmp_path / "dead-letter.jsonl", metrics)
    windows = SeriesWindows(4, dead.reject)
    for t in (10.0, 20.0, 30.0):
        assert windows.add(_point(t, t)) is not None
    assert windows.add(_point(30.0, 30.0, index=3)) is None  # same time, same value: a retry
    assert windows.add(_point(20.0, 20.0, index=4)) is None  # a retry of an older point is a duplicate too
    assert windows.add(_point(20.0, 21.0, index=5)) is None  # same time, other value
    assert windows.add(_point(25.0, 1.0, index=6)) is None  # older than the newest: late
    assert windows.add(_point(40.0, math.nan, index=7)) is None
    assert windows.add(_point(40.0, math.inf, index=8)) is None
    assert windows.add(_point(40.0, 40.0, index=9)) == 3  # rejected points did not take up indices
    assert dead.counts == {"duplicate": 2, "conflicting_duplicate": 1, "out_of_order": 1, "non_finite_value": 2}
    lines = [json.loads(line) for line in (tmp_path / "dead-letter.jsonl").read_text().splitlines()]
    assert [(line["key"], line["reason"]) for line in lines][:4] == [
        ("file.parquet#3", "duplicate"), ("file.parquet#4", "duplicate"), ("file.parquet#5", "conflicting_duplicate"),
        ("file.parquet#6", "out_of_order")]
    assert "accepted 20.0" in lines[2]["detail"]
    sample = metrics.registry.get_sample_value("streamssl_records_rejected_total", {"reason": "duplicate"})
    assert sample == 2.0
    np.testing.assert_array_equal(windows.values("a"), [10.0, 20.0, 30.0, 40.0])


def test_a_repeat_older_than_the_kept_points_counts_as_out_of_order() -> None:
    reasons: list[str] = []
    windows = SeriesWindows(2, lambda source, key, reason, detail: reasons.append(reason))
    for t in range(4):
        windows.add(_point(float(t), 1.0))
    windows.add(_point(0.0, 1.0))
    assert reasons == ["out_of_order"]


def test_state_round_trip_continues_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    points = [_point(float(t), float(rng.normal()), series="ab"[t % 2]) for t in range(40)]
    straight, first = SeriesWindows(8), SeriesWindows(8)
    for point in points:
        straight.add(point)
    for point in points[:25]:
        first.add(point)
    path = tmp_path / "windows.pt"
    torch.save(first.state_dict(), path)
    resumed = SeriesWindows(8)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    # a point the saved windows have seen is still recognised as a duplicate after the round trip
    assert resumed.add(points[23]) is None
    for point in points[25:]:
        resumed.add(point)
    for series in ("a", "b"):
        assert resumed.count(series) == straight.count(series) == 20
        np.testing.assert_array_equal(resumed.values(series), straight.values(series))
    with pytest.raises(ValueError, match="keep 8 points"):
        SeriesWindows(4).load_state_dict(first.state_dict())


def test_at_most_max_series_are_kept_and_the_one_updated_longest_ago_goes(tmp_path: Path) -> None:
    dropped: list[str] = []
    windows = SeriesWindows(4, max_series=2, on_evict=dropped.append)
    for t, series in enumerate("abac"):  # c is new with a and b kept: b was updated longest ago
        windows.add(_point(float(t), 1.0, series))
    assert dropped == ["b"] and windows.series_ids() == ["a", "c"] and windows.count("a") == 2
    # the order of updates is state: a resumed copy drops the same series next
    path = tmp_path / "windows.pt"
    torch.save(windows.state_dict(), path)
    resumed = SeriesWindows(4, max_series=2, on_evict=dropped.append)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    assert windows.add(_point(9.0, 1.0, "b")) == 0 and resumed.add(_point(9.0, 1.0, "b")) == 0  # b starts afresh
    assert dropped == ["b", "a", "a"] and windows.series_ids() == resumed.series_ids() == ["b", "c"]
