"""Time-series points from a growing directory of table files (Parquet, Arrow IPC, CSV) or from Kafka records.

A series stream is a sequence of `Point(series_id, timestamp, value, source, index)`. Two ways in:

* `ParquetSeriesSource`: table files read whole, one after the other in name order, one point per row.
  A directory is a lake that grows: a writer publishes a file by renaming it into place, so hidden names
  (`.x.parquet`) and temp suffixes (`x.parquet.tmp`) are never read; follow mode polls for files that
  sort after the one being read. Files are immutable once published (rows appended to a file already
  read are never seen). The position is (file name, rows taken from it): a new source given
  `state_dict()` continues with exactly the next row.
* `parse_point(record)` (streams/series_points.py): a Kafka `Record` whose JSON value is
  `{"series_id", "timestamp", "value"}`.

pipeline/series/feed.py runs either source on a thread for the series job. `write_series_file` publishes
a Parquet file atomically (what a writer into a followed directory must do) and `demo_series()` writes the
electricity series as such files once.

Bad input is skipped with a reason and never stops a stream. Per row / record: "missing_value",
"non_numeric_value", "non_finite_value" (NaN, ±inf), "missing_timestamp", "bad_timestamp"; per row also
"missing_series_id" (a null in the series column), per record "not_json" and "missing_field". Per file
in a directory: "unreadable_file" (not a table of its suffix's kind, or without the configured columns)
and "out_of_order_file" (published with a name that sorts before the file being read, so it can't be
placed in the stream). A file given directly that cannot be read raises `SourceError` instead: there is
nothing else to read.

Timestamps are float seconds since the Unix epoch (UTC): timestamp and date columns are converted,
numbers are taken as they are (any unit the user keeps consistent), strings are ISO 8601 or numbers.
Without a time column the timestamp is the row's number in the stream (0, 1, 2, … across files).
"""

from __future__ import annotations

import bisect
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from streamssl.streams.files import atomic_write
from streamssl.streams.lake import cache_root
from streamssl.streams.records import RejectFn, SourceError
from streamssl.streams.series_data import load_series
from streamssl.streams.series_points import Point, finite_value, to_seconds
from streamssl.streams.waiting import WaitingNotice

log = logging.getLogger(__name__)

MODES = ("follow", "once")
SUFFIXES = (".parquet", ".pq", ".arrow", ".feather", ".ipc", ".csv")
DEFAULT_SERIES = "default"  # series_id of every point when there is no series column

_TIME_UNITS = {"s": 1.0, "ms": 1e3, "us": 1e6, "ns": 1e9}

@dataclass(frozen=True)
class SeriesFilePosition:
    """Where a `ParquetSeriesSource` is, after the last point yielded or row rejected: file (name of the file being
    read, None before the first), row (rows of it taken), files_done (files finished before it), rows_before (rows in
    those: timestamps when there is no time column). One process reads a series job's source: nothing to merge."""

    file: str | None = None
    row: int = 0
    files_done: int = 0
    rows_before: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "row": self.row, "files_done": self.files_done, "rows_before": self.rows_before}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> SeriesFilePosition:
        try:
            return cls(state["file"], int(state["row"]), int(state["files_done"]), int(state["rows_before"]))
        except (KeyError, TypeError, ValueError) as err:
            raise SourceError(f"saved stream position is not a ParquetSeriesSource position: {err!r}") from None


def list_series_files(directory: str) -> list[str]:
    """Names of a directory's published table files in name order (hidden and temp names are skipped)."""
    try:
        with os.scandir(directory) as entries:
            return sorted(e.name for e in entries
                          if e.name.lower().endswith(SUFFIXES) and not e.name.startswith(".") and e.is_file())
    except FileNotFoundError:  # a lake being recreated or remounted: keep polling
        return []


def read_table(path: str, columns: list[str]) -> pa.Table:
    """The named columns of a Parquet / Arrow IPC / CSV file; ValueError("one line") when it can't be read."""
    suffix = Path(path).suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        elif suffix == ".csv":
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(path)
        else:
            import pyarrow.feather as feather

            table = feather.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(str(err).splitlines()[0] if str(err) else type(err).__name__) from None
    absent = [name for name in columns if name not in table.column_names]
    if absent:
        raise ValueError(f"no column {', '.join(absent)} (columns: {', '.join(table.column_names)})")
    return table.select(columns)


def _timestamps(column: pa.ChunkedArray) -> list[Any]:
    """A time column as float seconds where the type says how (timestamp, date), raw Python values otherwise."""
    kind = column.type
    if pa.types.is_timestamp(kind):
        scale = _TIME_UNITS[kind.unit]
        return [None if v is None else v / scale for v in column.cast(pa.int64()).to_pylist()]
    if pa.types.is_date32(kind):
        return [None if v is None else v * 86400.0 for v in column.cast(pa.int32()).to_pylist()]
    if pa.types.is_date64(kind):
        return [None if v is None else v / 1e3 for v in column.cast(pa.int64()).to_pylist()]
    return column.to_pylist()


class ParquetSeriesSource:
    """Yields `Point`s from a table file or a directory of them, and knows its position.

    Args:
        directory_or_file: A directory of `.parquet`/`.pq`/`.arrow`/`.feather`/`.ipc`/`.csv` files (read in
            name order), or one such file.
        mode: "follow" (a directory: after the last file, poll for newer ones until closed) or "once"
            (read what there is, including files published meanwhile, then end). A file is read once.
        poll_seconds: Follow mode's wait between listings when nothing new is there.
        time_column: Column with the time; "" = the row's number in the stream.
        value_column: Column with the values.
        series_column: Column naming the series of each row; "" = one series, `DEFAULT_SERIES`.
        on_reject: Called as (source, key, reason, detail) for every skipped row or file; logged when None.

    Raises:
        SourceError: A missing path, a file of an unknown type, a bad mode; later, while iterating, a file
            given directly that cannot be read.

    Iterate in one thread; `state_dict`, `stats` and `close` may be called from others.
    """

    def __init__(self, directory_or_file: str, *, mode: str = "follow", poll_seconds: float = 2.0,
                 time_column: str = "timestamp", value_column: str = "value", series_column: str = "",
                 on_reject: RejectFn | None = None) -> None:
        if mode not in MODES:
            raise SourceError(f"unknown series data mode '{mode}'; valid: {', '.join(MODES)}")
        if poll_seconds <= 0 or not value_column:
            raise SourceError(f"need poll_seconds > 0 and a value column, got {poll_seconds}, {value_column!r}")
        path = Path(directory_or_file)
        if path.is_dir():
            self._directory: str | None = str(path)
        elif path.is_file():
            if not path.name.lower().endswith(SUFFIXES):
                raise SourceError(f"{path}: unsupported series file type (expected {', '.join(SUFFIXES)})")
            self._directory, mode = None, "once"
        else:
            raise SourceError(f"series data path not found: {directory_or_file}")
        self._path = str(path)
        self._mode = mode
        self._poll_seconds = poll_seconds
        self._columns = (time_column, value_column, series_column)
        self._on_reject = on_reject
        self._closed = threading.Event()
        self._waiting = WaitingNotice("series files", self._path)
        self._known: set[str] | None = None  # names listed so far, to spot late files; None until the first listing
        self._listing: list[str] = []
        # The position; see SeriesFilePosition.
        self._file: str | None = None
        self._row = 0
        self._files_done = 0
        self._rows_before = 0

    # --- position ------------------------------------------------------------------------------
    def position(self) -> SeriesFilePosition:
        return SeriesFilePosition(self._file, self._row, self._files_done, self._rows_before)

    def state_dict(self) -> dict[str, Any]:
        """`position()` as plain data (see `SeriesFilePosition`)."""
        return self.position().to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the position `state` describes; an empty dict (nothing read yet) is a no-op."""
        if not state:
            return
        position = SeriesFilePosition.from_dict(state)
        self._file, self._row, self._files_done, self._rows_before = (position.file, position.row, position.files_done,
                                                                      position.rows_before)
        self._known = None

    def stats(self) -> dict[str, float]:
        """Position and lag gauges: file_index, row, files_pending."""
        pending = len(self._listing) - (bisect.bisect_right(self._listing, self._file) if self._file else 0)
        return {"file_index": float(self._files_done), "row": float(self._row), "files_pending": float(max(pending, 0))}

    def close(self) -> None:
        """Ends iteration at the next point, and a follow-mode wait at once."""
        self._closed.set()

    # --- reading -------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Point]:
        if self._directory is None:
            yield from self._file_points(self._path, strict=True)
            return
        if self._file is not None:
            yield from self._file_points(os.path.join(self._directory, self._file), strict=False)
        while not self._closed.is_set():
            newer = self._relist()
            if not newer:
                if self._mode == "once":
                    return
                self._waiting.dry()
                self._closed.wait(self._poll_seconds)
                continue
            self._waiting.found()
            if self._file is not None:
                self._files_done += 1
                self._rows_before += self._row
            self._file, self._row = newer[0], 0
            yield from self._file_points(os.path.join(self._directory, newer[0]), strict=False)

    def _reject(self, source: str, key: str, reason: str, detail: str = "") -> None:
        if self._on_reject is not None:
            self._on_reject(source, key, reason, detail)
        else:
            log.warning("skipped %s %s: %s %s", source, key, reason, detail)

    def _relist(self) -> list[str]:
        """Lists the directory; reports new files named at or before the position; returns the ones after it."""
        assert self._directory is not None
        names = list_series_files(self._directory)
        baseline, known = self._known is None, self._known or set()
        for name in names:
            if name not in known:
                known.add(name)
                # Name order is stream order: a file that sorts before the position can't be placed.
                if not baseline and self._file is not None and name <= self._file:
                    self._reject(os.path.join(self._directory, name), "", "out_of_order_file",
                                 f"published after {self._file} was read")
        self._known, self._listing = known, names
        return [name for name in names if self._file is None or name > self._file]

    def _file_points(self, path: str, strict: bool) -> Iterator[Point]:
        """The file's points from row `self._row` on, advancing the position past rejected rows too."""
        time_column, value_column, series_column = self._columns
        try:
            table = read_table(path, [c for c in (time_column, value_column, series_column) if c])
        except ValueError as err:
            if strict:
                raise SourceError(f"cannot read {path}: {err}") from None
            self._reject(path, "", "unreadable_file", str(err))
            return
        times = _timestamps(table.column(time_column)) if time_column else None
        values = table.column(value_column).to_pylist()
        series = table.column(series_column).to_pylist() if series_column else None
        for row in range(self._row, table.num_rows):
            if self._closed.is_set():
                return
            self._row = row + 1
            try:
                value = finite_value(values[row])
                timestamp = to_seconds(times[row]) if times is not None else float(self._rows_before + row)
                if series is not None and series[row] is None:
                    raise ValueError("missing_series_id")
            except ValueError as err:
                reason, _, detail = str(err).partition(": ")
                self._reject(path, f"{os.path.basename(path)}#{row}", reason, detail)
                continue
            yield Point(str(series[row]) if series is not None else DEFAULT_SERIES, timestamp, value, path, row)


def write_series_file(path: Path, timestamps: Any, values: Any, series_ids: Any = None, *,
                      time_column: str = "timestamp", value_column: str = "value", series_column: str = "series_id") -> Path:
    """Writes one Parquet file that readers see whole or not at all (temp name in the same folder, fsync, rename).

    Args:
        path: final file path, e.g. `lake/part-000042.parquet`.
        timestamps, values: equal-length sequences (numpy datetime64 / numbers; floats).
        series_ids: optional per-row series names (written as `series_column`).
    """
    import pyarrow.parquet as pq

    path = Path(path)
    columns = {time_column: pa.array(timestamps), value_column: pa.array(values, type=pa.float64())}
    if series_ids is not None:
        columns[series_column] = pa.array(series_ids, type=pa.string())
    with atomic_write(path) as handle:
        pq.write_table(pa.table(columns), handle)
    return path


def demo_series(root: Path | None = None, rows_per_file: int = 2000) -> Path:
    """The electricity series (26,304 hourly points) as Parquet files `part-NNNNNN.parquet` in the cache, written once.

    Built in a hidden sibling folder and renamed into place: a crash half-way never leaves half a series behind.
    """
    directory = Path(root or cache_root() / "series") / "electricity"
    if directory.is_dir():
        return directory
    timestamps, values = load_series("electricity")
    directory.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".electricity.", suffix=".tmp"))
    try:
        for number, start in enumerate(range(0, len(values), rows_per_file)):
            rows = slice(start, start + rows_per_file)
            write_series_file(temp / f"part-{number:06d}.parquet", timestamps[rows], values[rows])
        os.rename(temp, directory)
    except OSError:
        if not directory.is_dir():
            raise  # else another process finished first
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return directory
