"""Series loading: the three bundled real sets, CSV/Parquet files, missing values, and one-line errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streamssl.streams.records import SourceError
from streamssl.streams.series_data import load_series


@pytest.mark.parametrize(("name", "length", "first", "last_time"), [
    ("electricity", 26304, 1300.576323987539, "2014-12-31T23:00:00"),
    ("temperature", 43824, -11.0, "2014-12-31T23:00:00"),
    ("exchange", 1867, 0.5861, "1987-05-21T00:00:00"),
])
def test_bundled_sets(name: str, length: int, first: float, last_time: str) -> None:
    timestamps, values = load_series(name)
    assert len(values) == len(timestamps) == length
    assert values.dtype == np.float64 and np.isfinite(values).all()
    assert values[0] == pytest.approx(first)
    assert str(timestamps[-1]) == last_time
    assert (np.diff(timestamps) > np.timedelta64(0, "s")).all()


def test_exchange_other_currency() -> None:
    _, pound = load_series("exchange", value_column="bp")
    assert pound[0] == pytest.approx(2.249)
    with pytest.raises(SourceError, match="no value column 'yen'"):
        load_series("exchange", value_column="yen")


def test_csv_missing_values_interpolated_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "s.csv"
    # leading NA dropped, interior NA / empty / garbage filled linearly, trailing NA dropped
    path.write_text("t,v,other\n0,NA,a\n1,1.0,b\n2,,c\n3,x,d\n4,4.0,e\n5,5.0,f\n6,NA,g\n")
    with caplog.at_level(logging.INFO, logger="streamssl.streams.series_data"):
        timestamps, values = load_series(str(path), "v", "t")
    np.testing.assert_array_equal(values, [1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_array_equal(timestamps, [1, 2, 3, 4, 5])
    assert "2 interior missing values filled" in caplog.text
    assert "dropped 1 leading and 1 trailing" in caplog.text


def test_csv_sorted_by_time_and_row_order(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text("when,value\n2024-01-01 02:00:00,3\n2024-01-01 00:00:00,1\n2024-01-01 01:00:00,2\n")
    timestamps, values = load_series(str(path), "value", "when")
    np.testing.assert_array_equal(values, [1.0, 2.0, 3.0])
    assert str(timestamps[0]) == "2024-01-01T00:00:00"
    # no time column: row order, and the only numeric column is found by itself
    _, values = load_series(str(path), "", "")
    np.testing.assert_array_equal(values, [3.0, 1.0, 2.0])


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "s.parquet"
    times = np.arange(4).astype("datetime64[h]").astype("datetime64[s]")
    pq.write_table(pa.table({"timestamp": times, "value": [1.5, None, 3.5, 4.0]}), path)
    timestamps, values = load_series(str(path), "value", "timestamp")
    np.testing.assert_array_equal(values, [1.5, 2.5, 3.5, 4.0])
    assert timestamps.dtype.kind == "M"


@pytest.mark.parametrize(("content", "value_column", "time_column", "message"), [
    (None, "value", "", "series file not found"),
    ("a,b\n1,2\n", "value", "", "no value column 'value' (columns: a, b)"),
    ("a,b\n1,2\n", "b", "timestamp", "no time column 'timestamp'"),
    ("a,b\n1,2\n", "", "", "name the value column (numeric columns: a, b)"),
    ("a,b\n1,2\n1,NA\n", "b", "", "fewer than two observed values"),
])
def test_bad_input_is_one_line(tmp_path: Path, content: str | None, value_column: str, time_column: str,
                               message: str) -> None:
    path = tmp_path / "s.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SourceError) as error:
        load_series(str(path), value_column, time_column)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_unsupported_file_type(tmp_path: Path) -> None:
    path = tmp_path / "s.xlsx"
    path.write_bytes(b"not a table")
    with pytest.raises(SourceError, match="unsupported file type"):
        load_series(str(path))
