"""The commit half of a Kafka source: offsets go to the broker only when the trainer asks (after a durable
checkpoint), from the iterating thread, for partitions this member still holds; a broker error keeps the
request queued for a retry, and a request that comes after the consumer closed is committed by a client
outside the group."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from streamssl.streams.kafka_assignment import REQUEST_TIMEOUT_MS

log = logging.getLogger(__name__)


class OffsetCommits:
    """Mixed into KafkaSource, whose __init__ sets these up; declared here so this half type-checks alone."""

    topic: str
    _config: dict[str, Any]
    _kafka: Any
    _lock: threading.Lock
    _counts: dict[str, int]
    _pending: dict[int, tuple[int, str]]  # partition -> (offset, metadata) requested and not committed yet
    _next_commit: float
    _last_assigned: frozenset[int]
    _failed: Callable[[str, Exception], float]
    _succeeded: Callable[[], None]

    def _perform_commits(self, consumer: Any, force: bool = False) -> None:
        """Commits what was requested, for the partitions held now; broker errors keep it queued for a retry."""
        if not self._pending or (not force and time.monotonic() < self._next_commit):
            return
        with self._lock:
            pending, self._pending = self._pending, {}
        held = {tp.partition for tp in consumer.assignment()}
        self._commit(consumer, {partition: offset for partition, offset in pending.items() if partition in held}, pending)

    def _commit(self, consumer: Any, offsets: dict[int, tuple[int, str]], pending: dict[int, tuple[int, str]]) -> bool:
        kafka = self._kafka
        if not offsets:
            return True
        request = {kafka.TopicPartition(self.topic, partition): kafka.OffsetAndMetadata(offset, metadata, -1)
                   for partition, (offset, metadata) in offsets.items()}
        try:
            consumer.commit(request, timeout_ms=REQUEST_TIMEOUT_MS)
        except kafka.errors.CommitFailedError as err:
            # Real Kafka, after a rebalance: these partitions may be someone else's now; the next checkpoint commits.
            with self._lock:
                self._counts["commit_failures"] += 1
            log.warning("Kafka %s: commit of %s refused (%s); the next checkpoint commits again", self.topic,
                        _offsets_only(offsets), str(err).splitlines()[0][:200] if str(err) else type(err).__name__)
            return False
        except kafka.errors.KafkaError as err:
            with self._lock:
                self._counts["commit_failures"] += 1
                for partition, offset in pending.items():
                    self._pending.setdefault(partition, offset)  # a newer request, if any, wins
            self._next_commit = time.monotonic() + self._failed(f"commit of {_offsets_only(offsets)}", err)
            return False
        self._succeeded()
        with self._lock:
            self._counts["commits"] += 1
        return True

    def _commit_after_close(self) -> None:
        """A commit requested after the consumer closed (e.g. the final checkpoint's), for the partitions it held last.

        Committed by a client outside the group, which real Kafka accepts only while the group has no
        members; otherwise those partitions belong to someone else now and the refusal is counted.
        """
        with self._lock:
            pending, self._pending = self._pending, {}
        offsets = {partition: offset for partition, offset in pending.items() if partition in self._last_assigned}
        if not offsets:
            return
        kafka = self._kafka
        try:
            consumer = kafka.KafkaConsumer(**{**self._config, "bootstrap_timeout_ms": REQUEST_TIMEOUT_MS})
        except kafka.errors.KafkaError as err:
            with self._lock:
                self._counts["commit_failures"] += 1
            log.warning("Kafka %s: final commit of %s failed: %s", self.topic, _offsets_only(offsets),
                        type(err).__name__)
            return
        try:
            self._commit(consumer, offsets, {})
        finally:
            consumer.close(autocommit=False, timeout_ms=REQUEST_TIMEOUT_MS)


def _offsets_only(offsets: dict[int, tuple[int, str]]) -> dict[int, int]:
    """Requested commits as {partition: offset}, for log lines."""
    return {partition: offset for partition, (offset, _) in offsets.items()}
