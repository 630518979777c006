"""One time-series point, and how a value, a timestamp and a Kafka record become one (or a reason they cannot).

Every parse failure is a ValueError "reason: detail", which the sources turn into that record's reject:
"missing_value", "non_numeric_value", "non_finite_value", "missing_timestamp", "bad_timestamp", and for a
Kafka record "not_json" and "missing_field".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from streamssl.streams.records import Record

MAX_SERIES_ID = 256  # characters of a Kafka point's series_id


@dataclass(frozen=True)
class Point:
    """One observation of one series."""

    series_id: str
    timestamp: float  # seconds since the epoch (UTC); the row number when there is no time column
    value: float  # finite: non-finite values never become points
    source: str  # file path, or Kafka record source (topic/partition)
    index: int  # row in that file, or the record's index (offset)

    @property
    def key(self) -> str:
        """A name for dead letters and logs: `source#index`."""
        return f"{self.source}#{self.index}"


def finite_value(value: Any) -> float:
    """A value as a finite float; ValueError("missing_value" / "non_numeric_value: …" / "non_finite_value: …")."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError("missing_value")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"non_numeric_value: {_shown(value)}")
    try:
        number = float(value)
    except (ValueError, OverflowError):
        raise ValueError(f"non_numeric_value: {_shown(value)}") from None
    if not math.isfinite(number):
        raise ValueError(f"non_finite_value: {_shown(value)}")
    return number


def to_seconds(value: Any) -> float:
    """A timestamp (number, numeric string or ISO 8601 string; naive = UTC) as float seconds since the epoch.

    Raises ValueError("missing_timestamp" / "bad_timestamp: …").
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError("missing_timestamp")
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)  # OverflowError for an int beyond float's range (a 400-digit number)
        elif isinstance(value, str):
            seconds = _string_seconds(value.strip())
        else:
            seconds = math.nan
    except (ValueError, OverflowError):
        seconds = math.nan
    if not math.isfinite(seconds):
        raise ValueError(f"bad_timestamp: {_shown(value)}")
    return seconds


def _string_seconds(text: str) -> float:
    """A numeric string as its number (an overflowing one becomes inf), anything else as an ISO 8601 time."""
    try:
        return float(text)
    except ValueError:
        pass
    parsed = datetime.fromisoformat(text)
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def _shown(value: Any) -> str:
    """`repr(value)` cut to 200 characters, without building the whole repr of a huge int or string."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 600:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    return repr(value if not isinstance(value, str) else value[:200])[:200]


def parse_point(record: Record) -> Point:
    """A Kafka record whose `json` field is {"series_id": str, "timestamp": number | ISO string, "value": number}.

    Raises:
        ValueError: "reason: detail" with reason not_json, missing_field, missing_value, non_numeric_value,
            non_finite_value, missing_timestamp or bad_timestamp.
    """
    payload = record.fields.get("json")
    if payload is None:
        raise ValueError(f"not_json: record has no json value (fields: {', '.join(record.fields) or 'none'})")
    try:
        # parse_constant: Python's json reads NaN / Infinity, which JSON itself does not allow
        data = json.loads(payload, parse_constant=lambda name: float(name.replace("Infinity", "inf")))
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError; RecursionError: deep nesting
        raise ValueError(f"not_json: {(str(err).splitlines() or [type(err).__name__])[0][:200]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"not_json: expected an object, got {type(data).__name__}")
    missing = [name for name in ("series_id", "timestamp", "value") if name not in data]
    if missing:
        raise ValueError(f"missing_field: {', '.join(missing)}")
    series_id = data["series_id"]
    if not isinstance(series_id, str | int) or isinstance(series_id, bool):
        raise ValueError(f"missing_field: series_id must be a string, got {_shown(series_id)}")
    series_id = str(series_id)
    if not series_id.isprintable() or not _is_utf8(series_id) or len(series_id) > MAX_SERIES_ID:
        # a name that becomes a checkpoint key, a manifest entry and a log word: printable UTF-8 text only
        raise ValueError(f"missing_field: series_id must be printable text of at most {MAX_SERIES_ID} characters, "
                         f"got {_shown(series_id)}")
    return Point(series_id, to_seconds(data["timestamp"]), finite_value(data["value"]), record.source, record.index)


def _is_utf8(text: str) -> bool:
    """False for a string with lone surrogates (JSON's "\\ud800"), which no UTF-8 writer accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
