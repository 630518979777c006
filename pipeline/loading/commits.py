"""The commits a run dir asks of its Kafka group: each names its checkpoint, and the last ones are journaled.

A checkpointed Kafka position is stamped with the run dir's lineage (a random id drawn at its first checkpoint and
kept by every later one, since each checkpoint holds it) and the step; a commit of its offsets carries both as
Kafka's offset metadata. Before the loop asks for a commit it also journals it in RUN_DIR/kafka-commits.json (the
last `JOURNAL_LENGTH`; rank N of a group: kafka-commits-rankN.json), because a broker may drop commit metadata
(Tansu does). On resume, the commits journaled for checkpoints newer than the one resumed from join the position
as `newer_commits`: such a checkpoint cannot be read (the newest file corrupt), and its commit must not make the
source skip the interval after the checkpoint it resumed from (streams/kafka_assignment.py, `start_offset`).
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from streamssl.pipeline.collective import Collective
from streamssl.pipeline.loading.positions import Position
from streamssl.streams.files import atomic_write
from streamssl.streams.kafka_assignment import KafkaPosition

log = logging.getLogger(__name__)

JOURNAL_LENGTH = 8


class CommitJournal:
    """The run dir's side of its Kafka commits (a no-op for every other kind of source)."""

    def __init__(self, run_dir: Path, collective: Collective) -> None:
        self.run_dir, self.collective = Path(run_dir), collective
        name = "kafka-commits.json" if collective.rank == 0 else f"kafka-commits-rank{collective.rank}.json"
        self.path = self.run_dir / name
        self.lineage = ""

    def checkpointed(self, position: Position | None, step: int) -> Position | None:
        """`position` as the checkpoint at `step` holds it: a Kafka one names the run dir's lineage and the step.

        Called by every worker at each checkpoint: the first call agrees on one lineage for all of them (the one
        they resumed with, else rank 0's new one).
        """
        if not self.lineage:
            resumed = position.lineage if isinstance(position, KafkaPosition) else ""
            choices = self.collective.gather((resumed, uuid.uuid4().hex))
            self.lineage = next((old for old, _ in choices if old), choices[0][1])
        if not isinstance(position, KafkaPosition):
            return position
        return replace(position, lineage=self.lineage, step=step, newer_commits={})

    def committing(self, position: Position | None) -> None:
        """Journals the commit of a checkpointed position, before it is asked for."""
        if not isinstance(position, KafkaPosition) or not position.lineage:
            return
        entry = {"lineage": position.lineage, "step": position.step,
                 "offsets": {str(partition): offset for partition, offset in sorted(position.offsets.items())}}
        entries = [*_entries(self.path), entry][-JOURNAL_LENGTH:]
        try:
            with atomic_write(self.path) as handle:
                handle.write((json.dumps({"commits": entries}) + "\n").encode())
        except OSError as err:  # a resume from an older checkpoint may then skip that interval (logged there too)
            log.warning("cannot journal the Kafka commit of step %d in %s: %s", position.step, self.path, err)

    def resumed(self, position: Position | None) -> Position | None:
        """A resumed Kafka position with the offsets this run dir committed for newer checkpoints than it."""
        if not isinstance(position, KafkaPosition) or not position.lineage:
            return position
        newer: dict[int, set[int]] = {}
        for path in sorted(self.run_dir.glob("kafka-commits*.json")):  # every worker's that this machine sees
            for entry in _entries(path):
                if entry["lineage"] == position.lineage and entry["step"] > position.step:
                    for partition, offset in entry["offsets"].items():
                        newer.setdefault(int(partition), set()).add(offset)
        if newer:
            log.info("resuming at step %d, older than the newest commit this run dir made: its offsets are set aside",
                     position.step)
        return replace(position, newer_commits={partition: tuple(sorted(offsets)) for partition, offsets in newer.items()})


def _entries(path: Path) -> list[dict[str, Any]]:
    """A journal's entries, oldest first, as {"lineage": str, "step": int, "offsets": {"PARTITION": int}}; none when
    it is missing or unreadable (nothing is then set aside)."""
    try:
        entries = [{"lineage": str(entry["lineage"]), "step": int(entry["step"]),
                    "offsets": {str(int(partition)): int(offset) for partition, offset in entry["offsets"].items()}}
                   for entry in json.loads(path.read_text())["commits"]]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("ignored the Kafka commit journal %s: %r", path, err)
        return []
    return entries
