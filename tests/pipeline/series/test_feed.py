"""The series feed: a source read on a thread, points and rejects handed out in stream order with positions."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from streamssl.pipeline.loading.messages import End, Reject
from streamssl.pipeline.series.feed import PointMessage, PointReader
from streamssl.streams.records import Record
from streamssl.streams.series_source import ParquetSeriesSource


class _RecordSource:
    """A source of Kafka-shaped records (the real broker path is tested end to end elsewhere)."""

    def __init__(self, payloads: list[bytes], on_reject: Any = None) -> None:
        self.payloads, self.offset = payloads, 0

    def __iter__(self):
        for offset, payload in enumerate(self.payloads):
            self.offset = offset + 1
            yield Record(f"k{offset + 1}", {"json": payload}, "kafka://points/0", offset)

    def position(self) -> dict[str, int]:  # the reader hands it on untouched
        return {"offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        pass

    def stats(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


def test_the_reader_turns_records_into_points_and_garbage_into_rejects_in_stream_order() -> None:
    payloads = [b'{"series_id": "a", "timestamp": 1, "value": 2.5}', b"{not json", b'{"series_id": "a", '
                b'"timestamp": 2, "value": NaN}', b'{"series_id": "b", "timestamp": 3, "value": 4}']
    reader = PointReader(lambda on_reject: _RecordSource(payloads, on_reject), None)
    messages = [reader.messages.get(timeout=5) for _ in range(5)]
    reader.close()
    assert [type(m) for m in messages] == [PointMessage, Reject, Reject, PointMessage, End]
    assert (messages[0].point.series_id, messages[0].point.value, messages[0].position) == ("a", 2.5, {"offset": 1})
    assert (messages[1].key, messages[1].reason) == ("k2", "not_json") and messages[1].payload == b"{not json"
    assert messages[1].position == {"offset": 2}
    assert messages[2].reason == "non_finite_value" and messages[3].point.series_id == "b"


def test_the_reader_hands_out_positions_with_rejects_and_is_never_stuck_behind_a_waiting_source(tmp_path: Path) -> None:
    (tmp_path / "lake").mkdir()
    (tmp_path / "lake" / "a.csv").write_text("timestamp,value\n0,1\n1,x\n2,3\n")
    reader = PointReader(lambda on_reject: ParquetSeriesSource(str(tmp_path / "lake"), poll_seconds=30,
                                                               on_reject=on_reject), None)
    messages = [reader.messages.get(timeout=5) for _ in range(3)]
    assert [(type(m), m.position.row) for m in messages] == [(PointMessage, 1), (Reject, 2), (PointMessage, 3)]
    started = time.monotonic()
    reader.close()  # the source is waiting 30 s for new files; closing ends that wait
    assert time.monotonic() - started < 2 and reader.messages.empty()


def test_a_record_that_parsing_fails_on_unexpectedly_is_that_records_reject_and_reading_goes_on() -> None:
    # parse_point refuses every payload a real source yields with a ValueError and its reason (test_series_source.py);
    # a field that is not bytes at all cannot come from one, so it stands in for a parser bug: still one reject.
    payloads: list[Any] = [b'{"series_id": "a", "timestamp": 1, "value": 2.5}', 12345,
                           b'{"series_id": "a", "timestamp": 2, "value": 3}']
    reader = PointReader(lambda on_reject: _RecordSource(payloads, on_reject), None)
    messages = [reader.messages.get(timeout=5) for _ in range(4)]
    reader.close()
    assert [type(m) for m in messages] == [PointMessage, Reject, PointMessage, End]
    assert (messages[1].key, messages[1].reason, messages[1].position) == ("k2", "unreadable_record", {"offset": 2})
    assert messages[1].detail.startswith("TypeError")
