"""Which partitions a Kafka source reads and where each one starts: the group's rebalances (or a worker's fixed
split), seeking every newly assigned partition before it is fetched, and the lag of those it holds; and the
source's position, `KafkaPosition`, with the merge of a group's positions.

`KafkaSource` (streams/kafka_source.py) is a `PartitionAssignment`: the state used here (`_offsets`,
`_assigned`, `_unpositioned`, `_lag`, the lock, the counters and backoff) is set up by its constructor.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from streamssl.streams.records import SourceError

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
    """

    topic: str
    offsets: dict[int, int]  # partition -> next offset

    def to_dict(self) -> dict[str, Any]:
        """{"kind": "kafka", "topic": T, "offsets": {"PARTITION": next offset}}, as checkpoints hold it."""
        return {"kind": "kafka", "topic": self.topic,
                "offsets": {str(partition): offset for partition, offset in sorted(self.offsets.items())}}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> KafkaPosition:
        """Raises SourceError unless `state` is a Kafka position with partitions and offsets >= 0."""
        if state.get("kind") != "kafka":
            raise SourceError(f"saved stream position is not a Kafka position (another data source?): {sorted(state)}")
        try:
            topic, offsets = str(state["topic"]), {int(part): int(offset) for part, offset in state["offsets"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise SourceError(f"saved stream position is not a KafkaSource position: {err!r}") from None
        if any(partition < 0 or offset < 0 for partition, offset in offsets.items()):
            raise SourceError(f"saved Kafka position has negative partitions or offsets: {state['offsets']}")
        return cls(topic, offsets)

    @classmethod
    def merge(cls, positions: Sequence[KafkaPosition | None], worker: int = 0) -> KafkaPosition | None:
        """All workers' positions as the one every worker resumes from (whichever `worker` it is).

        A group resumed with another worker count splits the partitions differently, so every worker gets
        the newest offset known of each partition (offsets only grow) and uses those of the ones it reads.
        None if no worker had read anything yet.
        """
        known = [position for position in positions if position is not None]
        offsets: dict[int, int] = {}
        for position in known:
            for partition, offset in position.offsets.items():
                offsets[partition] = max(offsets.get(partition, 0), offset)
        return cls(known[0].topic, offsets) if known else None


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
        """Seeks newly assigned partitions to max(checkpoint or last read, committed) and lets them be fetched."""
        with self._lock:
            todo, assignments = self._unpositioned, self._counts["rebalances"]
        if not todo or time.monotonic() < self._next_position:
            return
        kafka = self._kafka
        partitions = [kafka.TopicPartition(self.topic, partition) for partition in sorted(todo)]
        try:
            committed = {tp.partition: consumer.committed(tp, timeout_ms=REQUEST_TIMEOUT_MS) for tp in partitions}
        except kafka.errors.KafkaError as err:
            self._next_position = time.monotonic() + self._failed("reading committed offsets", err)
            return  # they stay paused: never read from a start that may be wrong
        self._succeeded()
        for tp in partitions:
            known = [offset for offset in (self._offsets.get(tp.partition), committed[tp.partition]) if offset is not None]
            try:
                if known:
                    consumer.seek(tp, max(known))
                    with self._lock:
                        self._offsets[tp.partition] = max(known)
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
