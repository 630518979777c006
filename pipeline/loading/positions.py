"""Stream positions as the loop keeps them: one typed position per kind of source, plain dicts in checkpoints.

Each source module defines its own (`ShardPosition`, `KafkaPosition`, `RayPosition`, `SeriesFilePosition`), with
`to_dict()` / `from_dict()`; `KafkaPosition` also merges a group's positions, as partitions move between workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeAlias

from streamssl.streams.kafka_assignment import KafkaPosition
from streamssl.streams.ray_source import RayPosition
from streamssl.streams.webdataset_source import ShardPosition

if TYPE_CHECKING:
    from streamssl.streams.series_source import SeriesFilePosition

Position: TypeAlias = "ShardPosition | KafkaPosition | RayPosition | SeriesFilePosition"


def position_from_dict(state: dict[str, Any]) -> Position | None:
    """A checkpoint's "source" entry as its source's position; None for {} (nothing read yet).

    Kafka and Ray positions name their kind; shard and series-file ones (whose stored form predates kinds and
    is kept, so that old checkpoints load) are told apart by their keys.
    """
    if not state:
        return None
    if state.get("kind") == "kafka":
        return KafkaPosition.from_dict(state)
    if state.get("kind") == "ray":
        return RayPosition.from_dict(state)
    if "mode" in state:
        return ShardPosition.from_dict(state)
    from streamssl.streams.series_source import SeriesFilePosition  # pyarrow loads only for series runs

    return SeriesFilePosition.from_dict(state)


def position_to_dict(position: Position | None) -> dict[str, Any]:
    """What a checkpoint stores: the position's plain form, {} before anything was read."""
    return {} if position is None else position.to_dict()


def merge_positions(positions: Sequence[Position | None], worker: int) -> Position | None:
    """The position worker `worker` of a group resumes from, given every worker's last checkpointed one (all of one
    kind): Kafka's merge, as partitions may move between workers; shards and Ray splits stay each worker's own."""
    known = [position for position in positions if position is not None]
    if known and isinstance(known[0], KafkaPosition):
        return KafkaPosition.merge([position for position in known if isinstance(position, KafkaPosition)], worker)
    return positions[worker]
