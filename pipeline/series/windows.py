"""Incremental windows: per series, the most recent points in time order, updated one point at a time.

The rule for points that don't extend a series (each is skipped, dead-lettered and counted by reason):

* a value that is NaN or ±inf: "non_finite_value" (a source normally rejects these first);
* a timestamp equal to one already accepted, with the same value: "duplicate" (a producer's retry);
* a timestamp equal to one already accepted, with another value: "conflicting_duplicate" (which one is
  right is unknowable here; the first one stays);
* a timestamp older than the newest accepted one of its series: "out_of_order".

So each series only ever grows forward in time, and a window is the last W accepted points. At most
`max_series` series are kept: a point of a new one beyond that drops the series updated longest ago
(`on_evict` hears which), which starts afresh if it comes back. Why no
reorder buffer: a buffer of lateness D delays every point, and therefore every forecast and its scoring,
by D for all series, to save the few points that arrive late; here late points cost nothing but their
dead letter, from which they can be replayed. Duplicates are recognised among the last `capacity`
points of a series; an older repeat counts as out of order. Points are taken as regularly spaced: a gap
in time is not filled, windows are the last W points that arrived, not the last W time steps.

All of it is state (`state_dict`), so a resumed run holds exactly the windows it checkpointed.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from streamssl.streams.records import RejectFn
from streamssl.streams.series_points import Point


class _Series:
    """One series' newest points (timestamps strictly increasing) and how many were ever accepted."""

    def __init__(self, capacity: int) -> None:
        self.timestamps: deque[float] = deque(maxlen=capacity)
        self.values: deque[float] = deque(maxlen=capacity)
        self.count = 0


class SeriesWindows:
    """The last `capacity` accepted points of every series.

    Args:
        capacity: points kept per series (at least the longest window that will be asked for).
        on_reject: called as (source, key, reason, detail) for every point that is skipped.
        max_series: series kept at once (0 = no bound).
        on_evict: called with the id of a series dropped to make room for a new one.
    """

    def __init__(self, capacity: int, on_reject: RejectFn | None = None, max_series: int = 0,
                 on_evict: Callable[[str], None] | None = None) -> None:
        if capacity < 1 or max_series < 0:
            raise ValueError(f"SeriesWindows: need capacity >= 1 and max_series >= 0, got {capacity}, {max_series}")
        self.capacity, self.max_series = capacity, max_series
        self.on_reject, self.on_evict = on_reject, on_evict
        self._series: dict[str, _Series] = {}  # least recently updated first

    def add(self, point: Point) -> int | None:
        """Applies the rule above; returns the point's index in its series (0, 1, …), or None if it was skipped."""
        reason, detail = self._check(point)
        if reason:
            if self.on_reject is not None:
                self.on_reject(point.source, point.key, reason, f"series {point.series_id!r}: {detail}")
            return None
        series = self._series.pop(point.series_id, None)  # and back in at the end: the most recently updated
        if series is None:
            series = _Series(self.capacity)
            if self.max_series and len(self._series) >= self.max_series:
                oldest = next(iter(self._series))
                del self._series[oldest]
                if self.on_evict is not None:
                    self.on_evict(oldest)
        self._series[point.series_id] = series
        series.timestamps.append(point.timestamp)
        series.values.append(point.value)
        series.count += 1
        return series.count - 1

    def _check(self, point: Point) -> tuple[str, str]:
        if not math.isfinite(point.value):
            return "non_finite_value", repr(point.value)
        if not math.isfinite(point.timestamp):
            return "bad_timestamp", repr(point.timestamp)
        series = self._series.get(point.series_id)
        if series is None or point.timestamp > series.timestamps[-1]:
            return "", ""
        at = bisect.bisect_left(series.timestamps, point.timestamp)
        if at < len(series.timestamps) and series.timestamps[at] == point.timestamp:
            if series.values[at] == point.value:
                return "duplicate", f"timestamp {point.timestamp!r}"
            return "conflicting_duplicate", (f"timestamp {point.timestamp!r}: value {point.value!r}, "
                                             f"accepted {series.values[at]!r}")
        return "out_of_order", f"timestamp {point.timestamp!r} < newest {series.timestamps[-1]!r}"

    def copy(self) -> SeriesWindows:
        """An independent copy without `on_reject`: for looking ahead at the windows coming points will make."""
        twin = SeriesWindows(self.capacity, max_series=self.max_series)
        for sid, series in self._series.items():
            kept = twin._series[sid] = _Series(self.capacity)
            kept.timestamps.extend(series.timestamps)
            kept.values.extend(series.values)
            kept.count = series.count
        return twin

    def series_ids(self) -> list[str]:
        return sorted(self._series)

    def count(self, series_id: str) -> int:
        """Points of the series accepted so far (0 for an unknown one)."""
        series = self._series.get(series_id)
        return series.count if series is not None else 0

    def values(self, series_id: str, length: int | None = None) -> np.ndarray:
        """The last `length` (default: all kept) values of the series, oldest first, float64."""
        kept = self._series[series_id].values
        length = len(kept) if length is None else length
        if length > len(kept):
            raise ValueError(f"series {series_id!r} holds {len(kept)} points, not {length}")
        return np.fromiter((kept[i] for i in range(len(kept) - length, len(kept))), dtype=np.float64, count=length)

    def state_dict(self) -> dict[str, Any]:
        """Plain data and float64 tensors, fit for a `weights_only` checkpoint load."""
        return {"capacity": self.capacity, "series": {
            sid: {"count": s.count, "timestamps": torch.tensor(list(s.timestamps), dtype=torch.float64),
                  "values": torch.tensor(list(s.values), dtype=torch.float64)} for sid, s in self._series.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["capacity"]) != self.capacity:
            raise ValueError(f"saved windows keep {state['capacity']} points per series, these keep {self.capacity}")
        self._series = {}
        for sid, saved in state["series"].items():
            series = self._series[sid] = _Series(self.capacity)
            series.timestamps.extend(saved["timestamps"].tolist())
            series.values.extend(saved["values"].tolist())
            series.count = int(saved["count"])
