"""What every feed hands the loop: `Message = Batch | PointMessage | Tick | Reject | End | Failure`.

The data (an image `Batch`, a series `PointMessage`) and each `Reject` carry the position right after them, so
the loop checkpoints where the stream is for what it has handled, however far a feed has read ahead. The loop
dead-letters rejects, stops at `End` and raises a `Failure`: no feed does any of that itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

from torch import Tensor

from streamssl.pipeline.loading.positions import Position

if TYPE_CHECKING:
    from streamssl.streams.series_points import Point


@dataclass
class Batch:
    images: Tensor  # uint8 [B,C,H,W]
    keys: list[str]
    position: Position | None  # the source right after the batch's last record
    source_stats: dict[str, float]
    ids: Tensor  # int64 [B], record_id(key) of each record
    # int64 [B, 2]: each image's height and width at the top left of images (the rest is padding); None: all of it
    extents: Tensor | None = None


@dataclass
class PointMessage:
    point: Point
    position: Position | None = None  # the source right after this point


@dataclass
class Tick:
    """"Take the next batch", to a task that holds its data itself (the offline forecaster): no position, as which
    batch comes next is the task's sampler, part of its own state."""

    position: None = None


@dataclass
class Reject:
    """A record the source or decoder refused: the loop dead-letters it and moves to its position.

    That position is right after the rejected record, unless a feed still holds good records read before it (a
    batch being filled): then it is the last position before those, so that a checkpoint never skips them.
    """

    source: str
    key: str
    reason: str
    detail: str = ""
    payload: bytes = b""
    position: Position | None = None


@dataclass
class End:
    """A finite stream is done."""


@dataclass
class Failure:
    """The source failed for good (one line saying why); the run stops with it."""

    message: str


Message: TypeAlias = Batch | PointMessage | Tick | Reject | End | Failure
