"""Typed stream positions: plain dicts in checkpoints (old ones included), and the merge of a group's positions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from streamssl.pipeline.loading.positions import merge_positions, position_from_dict, position_to_dict
from streamssl.streams.kafka_assignment import KafkaPosition
from streamssl.streams.ray_source import RayPosition
from streamssl.streams.records import SourceError
from streamssl.streams.series_source import SeriesFilePosition
from streamssl.streams.webdataset_source import ShardPosition

FIXTURES = Path(__file__).parents[1] / "fixtures"


def test_two_kafka_workers_positions_merge_to_the_newest_offset_of_every_partition() -> None:
    # Worker 0 read partitions 0 and 1; partition 1 then moved to worker 1, which read on from offset 3 to 9.
    first, second = KafkaPosition("t", {0: 7, 1: 3}), KafkaPosition("t", {1: 9, 2: 4})
    merged = KafkaPosition("t", {0: 7, 1: 9, 2: 4})
    assert KafkaPosition.merge([first, second]) == merged
    # Every worker resumes from the merge, whichever partitions it reads now.
    assert merge_positions([first, second], 0) == merge_positions([first, second], 1) == merged
    assert merge_positions([None, second], 0) == second  # a worker that had read nothing yet
    assert merge_positions([None, None], 1) is None
    # Checkpointed positions name their run dir and step; a resumed one keeps every worker's newer commits.
    named = KafkaPosition.merge([KafkaPosition("t", {0: 7}, "L", 4, {0: (9,)}), KafkaPosition("t", {1: 3}, "L", 4, {1: (5,)})])
    assert (named.lineage, named.step, named.newer_commits) == ("L", 4, {0: (9,), 1: (5,)})


def test_shard_and_ray_positions_stay_each_workers_own() -> None:
    shards = [ShardPosition("cycle", shard="a.tar", sample_index=3), ShardPosition("cycle", shard="b.tar", sample_index=5)]
    assert merge_positions(shards, 1) is shards[1] and merge_positions(shards, 0) is shards[0]
    assert merge_positions([RayPosition(0, 64), RayPosition(1, 8)], 1) == RayPosition(1, 8)


def test_positions_round_trip_through_their_checkpoint_form() -> None:
    kafka = KafkaPosition("t", {2: 4, 0: 7})
    assert kafka.to_dict() == {"kind": "kafka", "topic": "t", "offsets": {"0": 7, "2": 4}}
    checkpointed = KafkaPosition("t", {0: 7}, "a" * 32, 12, {0: (9, 11)})
    assert checkpointed.to_dict() == {"kind": "kafka", "topic": "t", "offsets": {"0": 7}, "lineage": "a" * 32,
                                      "step": 12, "newer_commits": {"0": [9, 11]}}
    ray = RayPosition(1, 32)
    assert ray.to_dict() == {"kind": "ray", "pass": 1, "rows": 32}
    for position in (kafka, checkpointed, ray, SeriesFilePosition("part-001.parquet", 100, 1, 100),
                     ShardPosition("cycle", 2, ("a.tar", "b.tar"), 1, "b.tar", 7, (("k", {"png": b"x"}, "a.tar", 3),),
                                   (3, (1, 2, 3), None))):
        assert position_from_dict(position_to_dict(position)) == position
    assert position_from_dict({}) is None and position_to_dict(None) == {}


def test_checkpoints_written_before_typed_positions_load_as_them() -> None:
    image = torch.load(FIXTURES / "image-rotation-v1-ckpt-000000002.pt", weights_only=True)["source"]
    series = torch.load(FIXTURES / "series-forecast-v1-ckpt-000000005.pt", weights_only=True)["source"]
    shard = position_from_dict(image)
    assert isinstance(shard, ShardPosition) and (shard.shard, shard.sample_index, len(shard.buffer)) == (
        "lake/shard-000000.tar", 128, 64)
    assert position_from_dict(series) == SeriesFilePosition("part-000.parquet", 104, 0, 0)
    assert position_to_dict(shard) == image and position_to_dict(position_from_dict(series)) == series


@pytest.mark.parametrize("state", [{"kind": "kafka", "topic": "t", "offsets": {"0": -1}},
                                   {"kind": "kafka", "topic": "t", "offsets": {"zero": 1}},
                                   {"kind": "ray", "pass": 0}, {"kind": "ray", "pass": -1, "rows": 0},
                                   {"mode": "cycle", "shard": "x.tar"}, {"file": "a.parquet"}])
def test_a_malformed_saved_position_is_a_source_error(state: dict) -> None:
    with pytest.raises(SourceError, match="saved"):
        position_from_dict(state)
