"""ParquetSeriesSource on real files (Parquet, Arrow IPC, CSV) and parse_point on Kafka-shaped records."""

from __future__ import annotations

import itertools
import json
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pytest

from streamssl.streams.records import Record, SourceError
from streamssl.streams.series_points import Point, parse_point
from streamssl.streams.series_source import DEFAULT_SERIES, ParquetSeriesSource, write_series_file


class Rejects(list):
    """on_reject that remembers (file name, key, reason, detail)."""

    def __call__(self, source: str, key: str, reason: str, detail: str = "") -> None:
        self.append((Path(source).name, key, reason, detail))


def _lake(directory: Path, files: int = 3, rows: int = 5) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for number in range(files):
        start = number * rows
        write_series_file(directory / f"part-{number:03d}.parquet", np.arange(start, start + rows, dtype=float),
                          np.arange(start, start + rows, dtype=float) * 10)
    return directory


def _values(points: list[Point]) -> list[float]:
    return [point.value for point in points]


def _wait_for(condition, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_directory_is_read_in_name_order_skipping_temp_and_hidden_names(tmp_path: Path) -> None:
    lake = _lake(tmp_path / "lake")
    (lake / ".part-000.parquet.123.tmp").write_bytes(b"half a file")
    (lake / "part-009.parquet.tmp").write_bytes(b"half a file")
    (lake / "notes.txt").write_text("not a table")
    rejects = Rejects()
    points = list(ParquetSeriesSource(str(lake), mode="once", on_reject=rejects))
    assert _values(points) == [float(v * 10) for v in range(15)]
    assert [p.timestamp for p in points] == [float(v) for v in range(15)]
    assert points[6] == Point(DEFAULT_SERIES, 6.0, 60.0, str(lake / "part-001.parquet"), 1)
    assert rejects == []


def test_timestamp_columns_become_epoch_seconds_and_series_column_names_series(tmp_path: Path) -> None:
    path = tmp_path / "one.parquet"
    times = np.array(["2024-01-01T00:00", "2024-01-01T01:00"], dtype="datetime64[ms]")
    write_series_file(path, times, [1.5, 2.5], ["a", "b"])
    points = list(ParquetSeriesSource(str(path), series_column="series_id"))
    assert [(p.series_id, p.timestamp, p.value) for p in points] == [("a", 1704067200.0, 1.5), ("b", 1704070800.0, 2.5)]


def test_arrow_ipc_and_csv_files_with_iso_and_row_order_times(tmp_path: Path) -> None:
    feather.write_feather(pa.table({"t": ["2024-01-01T00:00:00Z", "2024-01-01T00:00:01+00:00"], "y": [1.0, 2.0]}),
                          tmp_path / "a.arrow")
    points = list(ParquetSeriesSource(str(tmp_path / "a.arrow"), time_column="t", value_column="y"))
    assert [p.timestamp for p in points] == [1704067200.0, 1704067201.0]
    (tmp_path / "b.csv").write_text("y\n3\n4\n")
    points = list(ParquetSeriesSource(str(tmp_path / "b.csv"), time_column="", value_column="y"))
    assert [(p.timestamp, p.value) for p in points] == [(0.0, 3.0), (1.0, 4.0)]


def test_row_order_timestamps_continue_across_files_and_resume(tmp_path: Path) -> None:
    lake = _lake(tmp_path / "lake", files=2, rows=3)
    source = ParquetSeriesSource(str(lake), mode="once", time_column="")
    first = list(itertools.islice(source, 4))
    again = ParquetSeriesSource(str(lake), mode="once", time_column="")
    again.load_state_dict(source.state_dict())
    assert [p.timestamp for p in first + list(again)] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


@pytest.mark.parametrize("taken", [0, 1, 5, 7, 14, 15])
def test_resumed_source_continues_with_exactly_the_next_point(tmp_path: Path, taken: int) -> None:
    lake = _lake(tmp_path / "lake")
    straight = _values(list(ParquetSeriesSource(str(lake), mode="once")))
    source = ParquetSeriesSource(str(lake), mode="once")
    head = _values(list(itertools.islice(source, taken)))
    state = source.state_dict()
    resumed = ParquetSeriesSource(str(lake), mode="once")
    resumed.load_state_dict(state)
    assert head + _values(list(resumed)) == straight
    with pytest.raises(SourceError, match="not a ParquetSeriesSource position"):
        resumed.load_state_dict({"file": "x"})


def test_follow_mode_reads_files_published_later_and_close_ends_the_wait(tmp_path: Path) -> None:
    lake = _lake(tmp_path / "lake", files=1, rows=4)
    source = ParquetSeriesSource(str(lake), mode="follow", poll_seconds=0.05)
    seen: list[Point] = []
    reader = threading.Thread(target=lambda: seen.extend(source))
    reader.start()
    assert _wait_for(lambda: len(seen) == 4)
    (lake / ".part-001.parquet.tmp").write_bytes(b"being written")  # a writer mid-way: never read
    time.sleep(0.2)
    write_series_file(lake / "part-001.parquet", [4.0, 5.0], [40.0, 50.0])
    assert _wait_for(lambda: len(seen) == 6)
    assert source.stats()["files_pending"] == 0
    started = time.monotonic()
    source.close()
    reader.join(timeout=5)
    assert not reader.is_alive() and time.monotonic() - started < 2
    assert _values(seen) == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]


def test_bad_rows_are_rejected_by_reason_and_the_rest_is_read(tmp_path: Path) -> None:
    csv = tmp_path / "rows.csv"
    csv.write_text("timestamp,value\n0,1.0\n1,NaN\n2,abc\n3,\n,2.0\nyesterday,3.0\n6,inf\n7,4.0\n")
    rejects = Rejects()
    points = list(ParquetSeriesSource(str(csv), on_reject=rejects))
    assert [(p.timestamp, p.value, p.index) for p in points] == [(0.0, 1.0, 0), (7.0, 4.0, 7)]
    assert [(key, reason) for _, key, reason, _ in rejects] == [
        ("rows.csv#1", "non_finite_value"), ("rows.csv#2", "non_numeric_value"), ("rows.csv#3", "missing_value"),
        ("rows.csv#4", "missing_timestamp"), ("rows.csv#5", "bad_timestamp"), ("rows.csv#6", "non_finite_value")]


def test_unreadable_and_late_files_in_a_directory_are_dead_lettered_and_reading_goes_on(tmp_path: Path) -> None:
    lake = _lake(tmp_path / "lake", files=1, rows=2)
    (lake / "part-001.parquet").write_bytes(b"PAR1 but not really")
    write_series_file(lake / "part-002.parquet", [9.0], [1.0])
    pa.parquet.write_table(pa.table({"timestamp": [1.0], "other": [2.0]}), lake / "part-003.parquet")
    write_series_file(lake / "part-004.parquet", [10.0], [3.0])
    rejects = Rejects()
    source = ParquetSeriesSource(str(lake), mode="follow", poll_seconds=0.05, on_reject=rejects)
    seen: list[Point] = []
    reader = threading.Thread(target=lambda: seen.extend(source))
    reader.start()
    assert _wait_for(lambda: len(seen) == 4)
    write_series_file(lake / "part-000b.parquet", [11.0], [5.0])  # sorts before the position: can't be placed
    assert _wait_for(lambda: len(rejects) == 3)
    source.close()
    reader.join(timeout=5)
    assert _values(seen) == [0.0, 10.0, 1.0, 3.0]
    assert [(name, reason) for name, _, reason, _ in rejects] == [
        ("part-001.parquet", "unreadable_file"), ("part-003.parquet", "unreadable_file"),
        ("part-000b.parquet", "out_of_order_file")]
    assert "no column value" in rejects[1][3]


def test_missing_path_and_a_bad_single_file_raise_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not found"):
        ParquetSeriesSource(str(tmp_path / "nope"))
    with pytest.raises(SourceError, match="unsupported"):
        (tmp_path / "x.txt").write_text("1")
        ParquetSeriesSource(str(tmp_path / "x.txt"))
    (tmp_path / "bad.parquet").write_bytes(b"garbage")
    with pytest.raises(SourceError, match=r"cannot read .*bad\.parquet"):
        list(ParquetSeriesSource(str(tmp_path / "bad.parquet")))


def _record(value: bytes, field: str = "json") -> Record:
    return Record("k1", {field: value}, "kafka://series/0", 41)


def test_parse_point_reads_kafka_json_records() -> None:
    point = parse_point(_record(json.dumps({"series_id": "m7", "timestamp": "2024-01-01T00:00:00", "value": 3}).encode()))
    assert point == Point("m7", 1704067200.0, 3.0, "kafka://series/0", 41)
    assert parse_point(_record(b'{"series_id": 5, "timestamp": 12.5, "value": "-1e3"}')).value == -1000.0
    with pytest.raises(ValueError, match=r"^not_json: record has no json value \(fields: bin\)"):
        parse_point(_record(b"\x00\x01", field="bin"))  # what KafkaSource makes of a value that is not a JSON object


@pytest.mark.parametrize(("payload", "reason"), [
    (b"\xff\xfe", "not_json"), (b"[1, 2]", "not_json"), (b'{"series_id": "a", "value": 1}', "missing_field"),
    (b'{"series_id": "a", "timestamp": 1, "value": "x"}', "non_numeric_value"),
    (b'{"series_id": "a", "timestamp": 1, "value": NaN}', "non_finite_value"),
    (b'{"series_id": "a", "timestamp": 1, "value": -Infinity}', "non_finite_value"),
    (b'{"series_id": "a", "timestamp": 1, "value": null}', "missing_value"),
    (b'{"series_id": "a", "timestamp": 1, "value": [1]}', "non_numeric_value"),
    (b'{"series_id": "a", "timestamp": "soon", "value": 1}', "bad_timestamp"),
    (b'{"series_id": null, "timestamp": 1, "value": 1}', "missing_field"),
    # each of these raised something other than ValueError once (OverflowError, RecursionError), or let through a
    # series name no UTF-8 writer takes
    (b'{"series_id": "a", "timestamp": ' + b"1" * 400 + b', "value": 1}', "bad_timestamp"),
    (b'{"series_id": "a", "timestamp": -' + b"1" * 400 + b', "value": 1}', "bad_timestamp"),
    (b'{"series_id": "a", "timestamp": "' + b"1" * 400 + b'", "value": 1}', "bad_timestamp"),
    (b'{"series_id": "a", "timestamp": 1e400, "value": 1}', "bad_timestamp"),
    (b'{"series_id": "a", "timestamp": true, "value": 1}', "bad_timestamp"),
    (b'{"series_id": "a", "timestamp": {"t": 1}, "value": 1}', "bad_timestamp"),
    (b'{"series_id": "a", "timestamp": "0000-01-01", "value": 1}', "bad_timestamp"),
    (b'{"series_id": "a", "timestamp": 1, "value": ' + b"1" * 400 + b"}", "non_numeric_value"),
    (b'{"series_id": "a", "timestamp": 1, "value": 1e400}', "non_finite_value"),
    (b'{"series_id": "a", "timestamp": 1, "value": true}', "non_numeric_value"),
    (b'{"series_id": "a", "timestamp": 1, "value": ' + b"1" * 5000 + b"}", "not_json"),
    (b'{"series_id": "\\ud800", "timestamp": 1, "value": 1}', "missing_field"),
    (b'{"series_id": "a\\nb", "timestamp": 1, "value": 1}', "missing_field"),
    (b'{"series_id": "' + b"x" * 300 + b'", "timestamp": 1, "value": 1}', "missing_field"),
    (b'{"series_id": 1.5, "timestamp": 1, "value": 1}', "missing_field"),
    (b'{"series_id": "a", "timestamp": 1, "value": 1', "not_json"),
    (b"{" + b'"a": [' * 100000, "not_json"),
    (b"\x80\x81{", "not_json"),
])
def test_parse_point_rejects_garbage_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=f"^{reason}"):
        parse_point(_record(payload))


def test_demo_series_is_the_electricity_series_as_parquet_files_written_once(tmp_path: Path) -> None:
    from streamssl.streams.series_data import load_series
    from streamssl.streams.series_source import demo_series

    directory = demo_series(tmp_path, rows_per_file=10000)
    assert sorted(p.name for p in directory.iterdir()) == ["part-000000.parquet", "part-000001.parquet",
                                                          "part-000002.parquet"]
    points = list(ParquetSeriesSource(str(directory), mode="once"))
    _, values = load_series("electricity")
    assert len(points) == len(values) == 26304
    assert [p.value for p in points[:3]] == values[:3].tolist()
    assert points[1].timestamp - points[0].timestamp == 3600.0
    mtime = (directory / "part-000000.parquet").stat().st_mtime_ns
    assert demo_series(tmp_path) == directory and (directory / "part-000000.parquet").stat().st_mtime_ns == mtime
