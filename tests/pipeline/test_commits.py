"""The run dir's Kafka commits: stamped with its lineage and step, journaled, and set aside when their checkpoint
is lost (the end-to-end case, a corrupt newest checkpoint: tests/pipeline/test_kafka_training.py)."""

from __future__ import annotations

import json
from pathlib import Path

from streamssl.pipeline.collective import Collective
from streamssl.pipeline.loading.commits import JOURNAL_LENGTH, CommitJournal
from streamssl.streams.kafka_assignment import KafkaPosition
from streamssl.streams.webdataset_source import ShardPosition


def test_checkpointed_positions_name_one_lineage_and_their_step(tmp_path: Path) -> None:
    journal = CommitJournal(tmp_path, Collective())
    first = journal.checkpointed(KafkaPosition("t", {0: 5}), 2)
    later = journal.checkpointed(KafkaPosition("t", {0: 9}), 4)
    assert isinstance(first, KafkaPosition) and isinstance(later, KafkaPosition)
    assert len(first.lineage) == 32 and later.lineage == first.lineage and (first.step, later.step) == (2, 4)
    # A resumed run keeps the lineage its checkpoint names; other sources' positions pass through.
    resumed = CommitJournal(tmp_path, Collective())
    again = resumed.checkpointed(KafkaPosition("t", {0: 9}, first.lineage, 4), 6)
    assert isinstance(again, KafkaPosition) and again.lineage == first.lineage
    shards = ShardPosition("cycle", shard="a.tar", sample_index=3)
    assert resumed.checkpointed(shards, 8) is shards and resumed.checkpointed(None, 8) is None


def test_commits_of_checkpoints_newer_than_the_resumed_one_join_its_position(tmp_path: Path) -> None:
    journal = CommitJournal(tmp_path, Collective())
    for step in range(2, 2 + 2 * (JOURNAL_LENGTH + 2), 2):
        journal.committing(journal.checkpointed(KafkaPosition("t", {0: step * 10, 1: step}), step))
    entries = json.loads(journal.path.read_text())["commits"]
    assert len(entries) == JOURNAL_LENGTH and entries[-1]["step"] == 20  # the last ones only
    lineage = entries[0]["lineage"]
    resumed = journal.resumed(KafkaPosition("t", {0: 160, 1: 16}, lineage, 16))
    assert isinstance(resumed, KafkaPosition) and resumed.newer_commits == {0: (180, 200), 1: (18, 20)}
    # Another run dir's lineage, or the newest checkpoint itself, sets nothing aside.
    other = journal.resumed(KafkaPosition("t", {0: 160}, "b" * 32, 16))
    newest = journal.resumed(KafkaPosition("t", {0: 200}, lineage, 20))
    assert isinstance(other, KafkaPosition) and isinstance(newest, KafkaPosition)
    assert other.newer_commits == {} and newest.newer_commits == {}


def test_an_unreadable_journal_sets_nothing_aside(tmp_path: Path) -> None:
    journal = CommitJournal(tmp_path, Collective())
    journal.path.write_text('{"commits": [{"lineage": "L", "step": "x"}]}')
    resumed = journal.resumed(KafkaPosition("t", {0: 1}, "L", 0))
    assert isinstance(resumed, KafkaPosition) and resumed.newer_commits == {}
    journal.committing(KafkaPosition("t", {0: 3}, "L", 2))  # and is replaced by the next commit's
    assert json.loads(journal.path.read_text())["commits"] == [{"lineage": "L", "step": 2, "offsets": {"0": 3}}]
