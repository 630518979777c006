"""What a source yields: a record of raw bytes plus where it came from; and the source errors."""

from __future__ import annotations

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
