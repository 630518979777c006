"""Messages a feed hands out besides its data (an image `Batch`, a series `PointMessage`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Reject:
    """A record the source or decoder refused: the loop dead-letters it and moves the position past it."""

    source: str
    key: str
    reason: str
    detail: str = ""
    payload: bytes = b""
    position: dict[str, Any] = field(default_factory=dict)


@dataclass
class End:
    """A finite stream is done."""


@dataclass
class Failure:
    """The source failed for good (one line saying why); the run stops with it."""

    message: str
