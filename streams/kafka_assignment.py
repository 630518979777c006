"""Which partitions a Kafka source reads and where each one starts: the group's rebalances (or a worker's fixed
split), seeking every newly assigned partition before it is fetched, and the lag of those it holds; and the
source's position, `KafkaPosition`, with the merge of a group's positions.

`KafkaSource` (streams/kafka_source.py) is a `PartitionAssignment`: the state used here (`_offsets`,
`_assigned`, `_unpositioned`, `_lag`, the lock, the counters and backoff) is set up by its constructor.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from streamssl.streams.records import SourceError

log = logging.getLogger(__name__)

LAG_REFRESH_SECONDS = 5.0
PARTITIONS_REFRESH_SECONDS = 30.0  # a split source looks this often for partitions added to the topic
# Bound on every blocking broker call made from the iterating thread (commit, committed offsets, end offsets),
# so that `close()` and a broker outage never hold the iteration for long.
REQUEST_TIMEOUT_MS = 2000


@dataclass(frozen=True)
class KafkaPosition:
    """Where a Kafka source is: the next offset to read of every partition it has read.

    Partitions keep their entry after being revoked (a rebalance usually hands them straight back), and
    entries loaded from a checkpoint stay until they are read past.

    A checkpointed position also names its checkpoint: `lineage` (the run dir's, kept by every checkpoint) and
    `step`; a commit of its offsets carries both (`commit_metadata`). A resumed one may hold `newer_commits`: the
    offsets this run dir committed for checkpoints newer than this one, which cannot be read any more.
    """

    topic: str
    offsets: dict[int, int]  # partition -> next offset
    lineage: str = ""
    step: int = -1
    newer_commits: dict[int, tuple[int, ...]] = field(default_factory=dict)  # partition -> offsets committed

    def to_dict(self) -> dict[str, Any]:
        """{"kind": "kafka", "topic": T, "offsets": {"PARTITION": next offset}} (+ "lineage", "step" once checkpointed,
        + "newer_commits" {"PARTITION": [offsets]} when resumed), as checkpoints hold it."""
        state: dict[str, Any] = {"kind": "kafka", "topic": self.topic,
                                 "offsets": {str(partition): offset for partition, offset in sorted(self.offsets.items())}}
        if self.lineage:
            state.update(lineage=self.lineage, step=self.step)
        if self.newer_commits:
            state["newer_commits"] = {str(partition): list(offsets) for partition, offsets in
                                      sorted(self.newer_commits.items())}
        return state

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> KafkaPosition:
        """Raises SourceError unless `state` is a Kafka position with partitions and offsets >= 0."""
        if state.get("kind") != "kafka":
            raise SourceError(f"saved stream position is not a Kafka position (another data source?): {sorted(state)}")
        try:
            topic, offsets = str(state["topic"]), {int(part): int(offset) for part, offset in state["offsets"].items()}
            lineage, step = str(state.get("lineage", "")), int(state.get("step", -1))
            newer = {int(part): tuple(int(offset) for offset in committed)
                     for part, committed in state.get("newer_commits", {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise SourceError(f"saved stream position is not a KafkaSource position: {err!r}") from None
        if any(partition < 0 or offset < 0 for partition, offset in offsets.items()):
            raise SourceError(f"saved Kafka position has negative partitions or offsets: {state['offsets']}")
        return cls(topic, offsets, lineage, step, newer)

    @classmethod
    def merge(cls, positions: Sequence[KafkaPosition | None], worker: int = 0) -> KafkaPosition | None:
        """All workers' positions as the one every worker resumes from (whichever `worker` it is).

        A group resumed with another worker count splits the partitions differently, so every worker gets
        the newest offset known of each partition (offsets only grow) and uses those of the ones it reads.
        None if no worker had read anything yet.
        """
        known = [position for position in positions if position is not None]
        if not known:
            return None
        offsets: dict[int, int] = {}
        newer: dict[int, set[int]] = {}
        for position in known:
            for partition, offset in position.offsets.items():
                offsets[partition] = max(offsets.get(partition, 0), offset)
            for partition, committed in position.newer_commits.items():
                newer.setdefault(partition, set()).update(committed)
        lineage = next((position.lineage for position in known if position.lineage), "")
        return cls(known[0].topic, offsets, lineage, max(position.step for position in known),
                   {partition: tuple(sorted(committed)) for partition, committed in newer.items()})


_METADATA = re.compile(r"streamssl lineage=(\w+) step=(\d+)")


def commit_metadata(position: KafkaPosition) -> str:
    """What a commit of `position`'s offsets says about them (Kafka's offset metadata): its run dir and step."""
    return f"streamssl lineage={position.lineage} step={position.step}" if position.lineage else ""


def start_offset(resumed: KafkaPosition | None, partition: int, mine: int | None, committed: int | None,
                 metadata: str | None) -> tuple[int | None, bool]:
    """Where an assigned partition starts: (offset or None for auto_offset_reset, whether the committed one was set
    aside as this run dir's own, from a checkpoint newer than the one it resumed from).

    The rule is the later of `mine` (the checkpoint's offset, or the last one read) and the group's committed
    offset: both mean "trained on and durably saved", and another member may have moved the partition on. Except
    that a commit this run dir made for a checkpoint newer than `resumed` is about one that can no longer be read
    (the newest checkpoint corrupt): the interval after `resumed` would be skipped, so `mine` wins. Such a commit
    is known by its metadata (this lineage, a later step), or, with a broker that drops commit metadata (Tansu),
    by its offset being one this run dir committed then (`resumed.newer_commits`).
    """
    known = [offset for offset in (mine, committed) if offset is not None]
    if resumed is None or not resumed.lineage or committed is None or (mine is not None and committed <= mine):
        return (max(known) if known else None), False
    named = _METADATA.fullmatch(metadata or "")
    own = (named.group(1) == resumed.lineage and int(named.group(2)) > resumed.step if named
           else committed in resumed.newer_commits.get(partition, ()))
    return (mine, True) if own else (committed, False)


class PartitionAssignment:
    """The assignment half of a Kafka source; every method runs on the iterating thread, except the rebalance
    callbacks, which only record what changed (kafka-python runs them on its own I/O thread)."""

    # Set up by KafkaSource.__init__ (see the module docstring); declared here so this half type-checks alone.
    topic: str
    group: str
    bootstrap: list[str]
    _config: dict[str, Any]
    _kafka: Any
    _split: tuple[int, int] | None
    _consumer: Any
    _lock: threading.Lock
    _offsets: dict[int, int]
    _assigned: frozenset[int]
    _unpositioned: frozenset[int]
    _lag: dict[int, int]
    _resumed: KafkaPosition | None  # the checkpoint's position the source was loaded with
    _counts: dict[str, int]
    _next_probe: float
    _next_position: float
    _next_partitions: float
    _failed: Callable[[str, Exception], float]  # counts a failed broker call; returns the backoff before a retry
    _succeeded: Callable[[], None]  # resets that backoff

    def committed_offsets(self) -> dict[int, int]:
        """The group's committed offsets for the topic, {partition: offset} (a separate client: any thread may ask)."""
        kafka = self._kafka
        try:
            consumer = kafka.KafkaConsumer(**{**self._config, "bootstrap_timeout_ms": REQUEST_TIMEOUT_MS * 5})
        except kafka.errors.KafkaError as err:
            raise SourceError(f"cannot reach Kafka at {','.join(self.bootstrap)}: {type(err).__name__}") from None
        try:
            partitions = consumer.partitions_for_topic(self.topic) or set()
            committed = {partition: consumer.committed(kafka.TopicPartition(self.topic, partition),
                                                       timeout_ms=REQUEST_TIMEOUT_MS * 5)
                         for partition in sorted(partitions)}
        except kafka.errors.KafkaError as err:
            raise SourceError(f"cannot read committed offsets of group {self.group}: {type(err).__name__}") from None
        finally:
            consumer.close(autocommit=False, timeout_ms=REQUEST_TIMEOUT_MS)
        return {partition: offset for partition, offset in committed.items() if offset is not None}

    def _assign_split(self, consumer: Any) -> None:
        """For a split source: takes this worker's partitions, and later any the topic gains."""
        if self._split is None or time.monotonic() < self._next_partitions:
            return
        kafka = self._kafka
        worker, workers = self._split
        try:
            partitions = consumer.partitions_for_topic(self.topic)
        except kafka.errors.KafkaError as err:
            self._next_partitions = time.monotonic() + self._failed("reading the topic's partitions", err)
            return
        if not partitions:  # no such topic (yet): a producer may create it
            self._next_partitions = time.monotonic() + self._failed("finding the topic", SourceError("no partitions"))
            return
        self._succeeded()
        self._next_partitions = time.monotonic() + PARTITIONS_REFRESH_SECONDS
        mine = frozenset(partition for partition in partitions if partition % workers == worker)
        if not mine:
            raise SourceError(f"Kafka topic {self.topic} has {len(partitions)} partition(s), fewer than the {workers} "
                              f"workers: worker {worker} would read nothing (add partitions or use fewer workers)")
        if mine != self._assigned:
            tps = [kafka.TopicPartition(self.topic, partition) for partition in sorted(mine)]
            consumer.assign(tps)
            self._on_assigned(tps)  # every one is sought again: to its own offset, or to the group's committed one

    def _position_assigned(self, consumer: Any) -> None:
        """Seeks newly assigned partitions to their start (`start_offset`) and lets them be fetched."""
        with self._lock:
            todo, assignments = self._unpositioned, self._counts["rebalances"]
        if not todo or time.monotonic() < self._next_position:
            return
        kafka = self._kafka
        partitions = [kafka.TopicPartition(self.topic, partition) for partition in sorted(todo)]
        try:
            committed = {tp.partition: consumer.committed(tp, metadata=True, timeout_ms=REQUEST_TIMEOUT_MS)
                         for tp in partitions}
        except kafka.errors.KafkaError as err:
            self._next_position = time.monotonic() + self._failed("reading committed offsets", err)
            return  # they stay paused: never read from a start that may be wrong
        self._succeeded()
        for tp in partitions:
            mine, theirs = self._offsets.get(tp.partition), committed[tp.partition]
            start, set_aside = start_offset(self._resumed, tp.partition, mine, getattr(theirs, "offset", None),
                                            getattr(theirs, "metadata", None))
            if set_aside:
                log.warning("Kafka %s partition %d: the committed offset %d is this run dir's, from a checkpoint newer "
                            "than step %d that cannot be read; starting at %s instead", self.topic, tp.partition,
                            theirs.offset, self._resumed.step if self._resumed else -1,
                            start if start is not None else self._config["auto_offset_reset"])
            try:
                if start is not None:
                    consumer.seek(tp, start)
                    with self._lock:
                        self._offsets[tp.partition] = start
                elif set_aside:  # kafka-python would start at the committed offset
                    (consumer.seek_to_beginning if self._config["auto_offset_reset"] == "earliest"
                     else consumer.seek_to_end)(tp)
                # else: kafka-python starts it at auto_offset_reset
                consumer.resume(tp)
            except (ValueError, KeyError):  # revoked again meanwhile; the next assignment positions it
                pass
        with self._lock:
            # A new assignment meanwhile may have paused some of them again: then all are done over next time.
            if self._counts["rebalances"] == assignments:
                self._unpositioned = self._unpositioned - todo

    def _refresh_lag(self, consumer: Any) -> None:
        """Lag per assigned partition from the broker's end offsets, at most every 5 s; also notices an outage.

        Tansu's end offsets are off (start of the last batch + 1), so lag read against Tansu is too low;
        real Kafka reports the log end offset.
        """
        now = time.monotonic()
        if now < self._next_probe:
            return
        kafka = self._kafka
        partitions = [kafka.TopicPartition(self.topic, partition)
                      for partition in sorted(self._assigned - self._unpositioned)]
        if not partitions:
            self._next_probe = now + LAG_REFRESH_SECONDS
            return
        try:
            ends = consumer.end_offsets(partitions, timeout_ms=REQUEST_TIMEOUT_MS)
            positions = {tp.partition: self._offsets.get(tp.partition) for tp in partitions}
            for tp in partitions:
                if positions[tp.partition] is None:  # nothing read yet: where the consumer will start
                    positions[tp.partition] = consumer.position(tp, timeout_ms=REQUEST_TIMEOUT_MS)
        except kafka.errors.KafkaError as err:
            # Polls during an outage just come back empty; this probe is what notices it and backs off.
            self._next_probe = time.monotonic() + self._failed("reading end offsets", err)
            return
        self._succeeded()
        with self._lock:
            self._lag = {tp.partition: max(ends[tp] - positions[tp.partition], 0) for tp in partitions if tp in ends}
        self._next_probe = time.monotonic() + LAG_REFRESH_SECONDS

    def _on_revoked(self, revoked: Iterable[Any]) -> None:
        # No commit here: offsets move only after a durable checkpoint. The partitions keep their place in
        # state_dict, so the next checkpoint still covers them if they come back.
        gone = {tp.partition for tp in revoked if tp.topic == self.topic}
        with self._lock:
            self._assigned = self._assigned - gone
            self._unpositioned = self._unpositioned - gone
            self._lag = {partition: lag for partition, lag in self._lag.items() if partition not in gone}

    def _on_assigned(self, assigned: Iterable[Any]) -> None:
        # Finding the committed offsets takes a broker call, which must not run on the I/O thread: pause the
        # partitions so nothing is fetched from kafka-python's default start, and let the iterating thread seek.
        mine = [tp for tp in assigned if tp.topic == self.topic]
        if mine and self._consumer is not None:
            self._consumer.pause(*mine)
        new = {tp.partition for tp in mine}
        with self._lock:
            self._assigned = self._assigned | new
            self._unpositioned = self._unpositioned | new
            self._counts["rebalances"] += 1
        self._next_position = 0.0


def _rebalance_listener(kafka: Any, source: PartitionAssignment) -> Any:
    """A kafka-python ConsumerRebalanceListener forwarding to the source (its base class loads with kafka-python)."""

    class Listener(kafka.ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked: Any) -> None:
            source._on_revoked(revoked)

        def on_partitions_assigned(self, assigned: Any) -> None:
            source._on_assigned(assigned)

    return Listener()
