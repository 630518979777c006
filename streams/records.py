"""What a source yields: a record of raw bytes plus where it came from; and the source errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Record:
    key: str  # the sample's __key__
    fields: dict[str, bytes]  # extension -> raw bytes, e.g. {"png": ..., "json": ...}
    source: str  # shard path or URL it came from
    index: int  # sample index within that shard (0-based)


RejectFn = Callable[[str, str, str], None]  # on_reject(source, key, reason)


class SourceError(Exception):
    """A data source that cannot be used at all (missing path, bad spec); one readable line."""


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
