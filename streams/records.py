"""What a source yields: a record of raw bytes plus where it came from; how it reports bad input; its errors; names
read from files as text that encodes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Record:
    key: str  # the sample's __key__
    fields: dict[str, bytes]  # extension -> raw bytes, e.g. {"png": ..., "json": ...}
    source: str  # shard path or URL it came from
    index: int  # sample index within that shard (0-based)


class RejectFn(Protocol):
    """`on_reject(source, key, reason, detail, payload)`: a record, row or shard a source skips as bad input.

    A source passes what it knows (a shard has no payload, a tombstone no detail); a receiver takes all five.
    """

    def __call__(self, source: str, key: str, reason: str, detail: str = "", payload: bytes = b"") -> None: ...


class SourceError(Exception):
    """A data source that cannot be used at all (missing path, bad spec); one readable line."""


def readable(name: str) -> str:
    """A name read from a file (a tar member's key or extension) as text that can be encoded: Python decodes names
    that are not UTF-8 with surrogateescape, and such a string fails wherever it is encoded (record ids, logs, dead
    letters). Its bytes that are not UTF-8 are spelled out (`caf\\xe9`) instead, the same way in every run."""
    try:
        name.encode()
        return name
    except UnicodeEncodeError:
        pass
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte: its code point
        return name.encode("utf-8", "backslashreplace").decode()


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"))


def sniff(value: bytes) -> str:
    """The field name for a message value: "png", "jpg", "webp" by magic bytes, "json" for a JSON object, else "bin"."""
    for magic, kind in _MAGIC:
        if value.startswith(magic):
            return kind
    if value[:4] == b"RIFF" and value[8:12] == b"WEBP":
        return "webp"
    if value.lstrip()[:1] == b"{":
        try:
            return "json" if isinstance(json.loads(value), dict) else "bin"
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return "bin"
    return "bin"
