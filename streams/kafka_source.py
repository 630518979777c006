"""A Kafka topic as a stream source: a consumer-group member that knows its position and commits only when told.

The position is the next offset of every partition this source has read (`state_dict()`), taken by
the loader after each batch and checkpointed with the model. Offsets go to the broker only through
`commit(state)`, which the trainer calls once the checkpoint holding `state` is durable: at-least-once,
and a partition that changes hands is re-read from the last durable checkpoint, so duplicates stay
within one checkpoint interval. On every assignment a partition starts at the later of the
checkpoint's offset and the group's committed offset: both mean "trained on and durably saved";
unless the commit is this run dir's own for a newer checkpoint than the one resumed from, which can
no longer be read (`start_offset` in streams/kafka_assignment.py). Each commit names its checkpoint
(run dir lineage and step) in the offset metadata.

kafka-python consumers are not thread-safe, so everything that talks to the broker happens on the
thread that iterates: `commit` only queues a request, `close` only raises a flag, and the rebalance
listener (which kafka-python 3 runs on its own I/O thread) only pauses new partitions until the
iterating thread has positioned them. Broker outages are retried with jittered exponential backoff and
counted; they never end the iteration, and neither does a record kafka-python cannot parse (rejected).

With `split=(worker, workers)` the source does not join the group: it assigns itself the partitions p
with p % workers == worker and uses the group only to store offsets, as Flink's and Spark's Kafka
readers do. That is how the workers of one data-parallel job share a topic: their set is fixed for the
job, so a group rebalance could only stall every worker's collectives while it settles.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Generator
from typing import Any

from streamssl.streams.kafka_assignment import (
    REQUEST_TIMEOUT_MS,
    KafkaPosition,
    PartitionAssignment,
    _rebalance_listener,
    commit_metadata,
)
from streamssl.streams.kafka_commits import OffsetCommits
from streamssl.streams.kafka_produce import check_resolvable, jittered, kafka_module, parse_kafka_url
from streamssl.streams.records import Record, RejectFn, SourceError, sniff

log = logging.getLogger(__name__)

OFFSET_RESETS = ("earliest", "latest")
# How long creating the consumer waits for a first broker before it counts as a retry (kafka-python: 30 s).
BOOTSTRAP_TIMEOUT_MS = 5000

class KafkaSource(PartitionAssignment, OffsetCommits):
    """Yields `Record`s from a Kafka topic as a member of a consumer group, with an exact resumable position.

    Args:
        spec: `kafka://HOST:PORT[,HOST:PORT...]/TOPIC[?group=G]`.
        on_reject: Called with (source, key, reason[, detail]) for a message that cannot be read at all (reason
            "empty_value": a null value / tombstone or zero bytes; "unreadable_record": kafka-python cannot
            parse it, key "TOPIC/PARTITION/OFFSET"); logged when None. Values that are merely undecodable are
            passed on: the loader decodes and dead-letters them.
        group: Consumer group when the spec has no `?group=`; default "streamssl".
        client_options: Passed to kafka-python's KafkaConsumer (security_protocol, sasl_*, ssl_*, client_id,
            fetch sizes, ...); they override the settings below.
        poll_timeout_ms: Longest wait in one poll; also how soon a `close()` from another thread is noticed.
        session_timeout_ms: Group session timeout (heartbeats every third of it).
        auto_offset_reset: Where a partition with neither a checkpointed nor a committed offset starts.
        retry_backoff_seconds: First wait after a failed broker call; doubles on each failure in a row (each
            wait is drawn from [half of it, all of it], so that the members of a group don't retry in step).
        max_backoff_seconds: Cap of that wait.
        split: (worker, workers): read the partitions p with p % workers == worker, assigned by this source
            rather than by the group (see the module docstring); offsets are still committed for the group.

    Raises:
        SourceError: A malformed spec, bad settings or unknown client options, or bootstrap hosts that do
            not exist; while iterating, a split whose worker gets no partition of the topic.

    Iterate in one thread; `commit`, `close`, `state_dict` and `stats` may be called from any thread.
    Each record is `Record(key, fields, source="kafka://TOPIC/PARTITION", index=offset)`: key = the message
    key, else its "id" header, else "TOPIC/PARTITION/OFFSET"; fields = the value under its sniffed type
    ("png", "jpg", "webp", "json", "bin") plus every header under its own name (e.g. "label").
    """

    def __init__(self, spec: str, *, on_reject: RejectFn | None = None, group: str = "",
                 client_options: dict[str, Any] | None = None, poll_timeout_ms: int = 200,
                 session_timeout_ms: int = 10000, auto_offset_reset: str = "earliest",
                 retry_backoff_seconds: float = 0.5, max_backoff_seconds: float = 30.0,
                 split: tuple[int, int] | None = None) -> None:
        self.bootstrap, self.topic, params = parse_kafka_url(spec)
        if split is not None and not 0 <= split[0] < split[1]:
            raise SourceError(f"a Kafka split needs 0 <= worker < workers, got {split}")
        self._split = split
        self.group = params.get("group") or group or "streamssl"
        if auto_offset_reset not in OFFSET_RESETS:
            raise SourceError(f"unknown auto_offset_reset '{auto_offset_reset}'; valid: {', '.join(OFFSET_RESETS)}")
        if poll_timeout_ms <= 0 or session_timeout_ms <= 0 or not 0 < retry_backoff_seconds <= max_backoff_seconds:
            raise SourceError("need poll_timeout_ms > 0, session_timeout_ms > 0 and "
                              f"0 < retry_backoff_seconds <= max_backoff_seconds, got {poll_timeout_ms}, "
                              f"{session_timeout_ms}, {retry_backoff_seconds}, {max_backoff_seconds}")
        self._kafka = kafka_module()
        unknown = sorted(set(client_options or {}) - set(self._kafka.KafkaConsumer.DEFAULT_CONFIG))
        if unknown:
            raise SourceError(f"unknown Kafka client option(s): {', '.join(unknown)}")
        check_resolvable(self.bootstrap)
        self._on_reject = on_reject
        self._poll_timeout_ms = poll_timeout_ms
        self._retry_backoff = retry_backoff_seconds
        self._max_backoff = max_backoff_seconds
        self._config: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap, "group_id": self.group, "enable_auto_commit": False,
            "auto_offset_reset": auto_offset_reset, "session_timeout_ms": session_timeout_ms,
            "heartbeat_interval_ms": max(session_timeout_ms // 3, 1), "bootstrap_timeout_ms": BOOTSTRAP_TIMEOUT_MS,
            **(client_options or {})}
        self._lock = threading.Lock()  # guards the dicts below against state_dict/stats/commit from other threads
        self._closed = threading.Event()
        self._offsets: dict[int, int] = {}  # the position: next offset per partition (read, or from the checkpoint)
        self._resumed: KafkaPosition | None = None
        self._pending: dict[int, tuple[int, str]] = {}  # requested commits not yet performed: offset, metadata
        self._assigned: frozenset[int] = frozenset()
        # Assigned but not yet moved to their start: paused, and nothing of theirs is handed out.
        self._unpositioned: frozenset[int] = frozenset()
        self._last_assigned: frozenset[int] = frozenset()  # for a commit that arrives after the consumer closed
        self._lag: dict[int, int] = {}
        self._counts = {"records": 0, "rejected": 0, "broker_retries": 0, "commit_failures": 0, "commits": 0,
                        "rebalances": 0}
        self._consumer: Any = None
        self._generator: Generator[Record, None, None] | None = None
        self._owner: int | None = None  # the iterating thread
        self._finished = False
        self._backoff = retry_backoff_seconds
        self._next_probe = 0.0
        self._next_commit = 0.0
        self._next_position = 0.0
        self._next_partitions = 0.0

    # --- position --------------------------------------------------------------------------------
    def position(self) -> KafkaPosition:
        """The next offset of every partition read so far (or loaded), right after the last record yielded."""
        with self._lock:
            return KafkaPosition(self.topic, dict(self._offsets), self._resumed.lineage if self._resumed else "")

    def state_dict(self) -> dict[str, Any]:
        """`position()` as plain data: {"kind": "kafka", "topic": T, "offsets": {"PARTITION": next offset}}."""
        return self.position().to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after `state` (call before iterating); an empty state is a new run that starts where the group is.

        On assignment each partition starts at the later of this checkpoint's offset and the group's
        committed offset, and at `auto_offset_reset` when it has neither; but not at a commit this run dir made
        for a newer checkpoint than this one (see `start_offset`).
        """
        if not state:
            return
        position = KafkaPosition.from_dict(state)
        if position.topic != self.topic:
            raise SourceError(f"saved Kafka position is for topic {position.topic}, not {self.topic}")
        with self._lock:
            self._offsets = dict(position.offsets)
            self._resumed = position

    def commit(self, state: dict[str, Any]) -> None:
        """Asks for the offsets of `state` (a `state_dict()`) to be committed for the group; returns at once.

        Call only once the checkpoint holding `state` is durable. The iterating thread commits at its
        next poll (or at close), and only partitions this source holds then; a newer request supersedes
        an older one that has not been performed yet.
        """
        if not state:
            return
        try:
            position = KafkaPosition.from_dict(state)
        except SourceError as err:
            log.warning("ignored a commit request for %s: %s", self.topic, err)
            return
        if position.topic != self.topic:
            log.warning("ignored a commit request for topic %s (this source reads %s)", position.topic, self.topic)
            return
        metadata = commit_metadata(position)
        with self._lock:
            self._pending.update({partition: (offset, metadata) for partition, offset in position.offsets.items()})

    def stats(self) -> dict[str, float]:
        """Counters and lag, exported as `streamssl_source_position{field=...}` gauges.

        records (yielded), rejected, commits, commit_failures, broker_retries (failed broker calls that
        were retried after a backoff), rebalances, assigned_partitions, and lag: messages behind the
        broker's end offsets in total and per assigned partition (`lag_pN`). Lag is computed from the
        broker's end offsets, refreshed at most every 5 s, so it trails by up to that much.
        """
        with self._lock:
            stats = {name: float(value) for name, value in self._counts.items()}
            stats["assigned_partitions"] = float(len(self._assigned))
            stats["lag"] = float(sum(self._lag.values()))
            stats.update({f"lag_p{partition}": float(lag) for partition, lag in sorted(self._lag.items())})
        return stats

    def close(self) -> None:
        """Ends the iteration: within ~poll_timeout from another thread, at once from the iterating thread.

        Requested commits are performed first, then the consumer leaves the group. A commit requested
        after the iteration already ended is performed here, by a short-lived client.
        """
        self._closed.set()
        generator = self._generator
        if (generator is not None and threading.get_ident() == self._owner
                and inspect.getgeneratorstate(generator) != inspect.GEN_RUNNING):
            generator.close()  # runs its cleanup here: pending commits, consumer closed
        if self._finished:
            self._commit_after_close()

    # --- reading ---------------------------------------------------------------------------------
    def __iter__(self) -> Generator[Record, None, None]:
        """Records from the position on, until `close()`: a Kafka topic never ends by itself."""
        if self._generator is None:  # one stream per source: iterating again continues it
            self._generator = self._records()
        return self._generator

    def _records(self) -> Generator[Record, None, None]:
        self._owner = threading.get_ident()
        consumer = self._connect()
        if consumer is None:
            return
        try:
            while not self._closed.is_set():
                self._perform_commits(consumer)
                self._assign_split(consumer)
                if self._split is not None and not self._assigned:  # the topic is not there yet: nothing to poll
                    self._closed.wait(max(self._next_partitions - time.monotonic(), 0.05))
                    continue
                self._position_assigned(consumer)
                for messages in self._poll(consumer).values():
                    for message in messages:
                        if self._closed.is_set():
                            return
                        # Revoked (or re-assigned and not positioned yet) while this batch was out: its new start wins.
                        if message.partition not in self._assigned or message.partition in self._unpositioned:
                            break
                        record = self._record(message)
                        if record is not None:
                            yield record
                self._refresh_lag(consumer)
        finally:
            self._shutdown(consumer)

    def _connect(self) -> Any:
        """A subscribed consumer, created on the iterating thread; retried while no broker answers; None if closed."""
        kafka = self._kafka
        while not self._closed.is_set():
            try:
                consumer = kafka.KafkaConsumer(**self._config)
            except kafka.errors.KafkaConfigurationError as err:
                raise SourceError(f"bad Kafka client options: {err}") from None
            except kafka.errors.KafkaError as err:
                self._closed.wait(self._failed("connecting", err))
                continue
            self._consumer = consumer
            if self._split is None:
                consumer.subscribe([self.topic], listener=_rebalance_listener(kafka, self))
            return consumer
        return None

    def _poll(self, consumer: Any) -> dict[Any, list[Any]]:
        kafka = self._kafka
        try:
            return consumer.poll(timeout_ms=self._poll_timeout_ms)
        except kafka.errors.CorruptRecordError as err:
            self._skip_unreadable(consumer, err)
            return {}
        except kafka.errors.KafkaError as err:
            self._closed.wait(self._failed("polling", err))
            return {}

    def _skip_unreadable(self, consumer: Any, err: Exception) -> None:
        """Rejects a record kafka-python cannot parse (a header name that is not UTF-8, a failed CRC) and seeks past it.

        kafka-python raises CorruptRecordError without saying where, and every later poll spins on the records it
        failed in: left alone, the source would never move again. Its fetcher holds those records, with their
        partition and the offset it failed at (private state of kafka-python 3; where it is missing, the poll is
        retried after a backoff as before). Records after a bad one in the same batch fail the same way (the
        batch is parsed from its start), so each of them is rejected in turn.
        """
        failed = getattr(getattr(consumer, "_fetcher", None), "_next_partition_records", None)
        tp, offset = getattr(failed, "topic_partition", None), getattr(failed, "next_fetch_offset", None)
        if tp is None or tp.topic != self.topic or not isinstance(offset, int):
            self._closed.wait(self._failed("polling", err))
            return
        try:
            consumer.seek(tp, offset + 1)
        except ValueError:  # revoked meanwhile: its new owner meets the record
            return
        with self._lock:
            self._offsets[tp.partition] = offset + 1
        detail = (str(err).splitlines() or [type(err).__name__])[0].removeprefix("[Error 2] CorruptRecordError: ")
        self._reject(f"kafka://{self.topic}/{tp.partition}", f"{self.topic}/{tp.partition}/{offset}",
                     "unreadable_record", detail[:300])

    def _reject(self, source: str, key: str, reason: str, detail: str = "") -> None:
        with self._lock:
            self._counts["rejected"] += 1
        if self._on_reject is not None:
            self._on_reject(source, key, reason, detail)
        else:
            log.warning("skipped %s %s: %s %s", source, key, reason, detail)

    def _record(self, message: Any) -> Record | None:
        """The message as a Record, or None after rejecting it; either way the position moves past it."""
        partition, offset = message.partition, message.offset
        with self._lock:
            self._offsets[partition] = offset + 1
        source = f"kafka://{self.topic}/{partition}"
        headers = {name: value or b"" for name, value in message.headers or ()}
        if message.key:
            key = message.key.decode("utf-8", "backslashreplace")
        elif headers.get("id"):
            key = headers["id"].decode("utf-8", "backslashreplace")
        else:
            key = f"{self.topic}/{partition}/{offset}"
        value = message.value
        if not value:  # a tombstone or zero bytes: nothing the loader could decode or dead-letter
            self._reject(source, key, "empty_value")
            return None
        self._counts["records"] += 1
        headers[sniff(value)] = value
        return Record(key, headers, source, offset)

    # --- broker calls on the iterating thread ----------------------------------------------------
    def _failed(self, action: str, err: Exception) -> float:
        """Counts and logs a failed broker call; returns how long to back off before the next try."""
        delay = jittered(self._backoff)
        self._backoff = min(self._backoff * 2, self._max_backoff)
        with self._lock:
            self._counts["broker_retries"] += 1
        log.warning("Kafka %s %s failed (%s: %s); retrying in %.1f s", self.topic, action, type(err).__name__,
                    str(err).splitlines()[0][:200] if str(err) else "", delay)
        return delay

    def _succeeded(self) -> None:
        self._backoff = self._retry_backoff

    def _shutdown(self, consumer: Any) -> None:
        """Performs the requested commits once more, then leaves the group and closes the consumer."""
        try:
            self._perform_commits(consumer, force=True)
        finally:
            with self._lock:
                self._last_assigned = self._assigned
                self._assigned, self._unpositioned, self._lag = frozenset(), frozenset(), {}
            consumer.close(autocommit=False, timeout_ms=REQUEST_TIMEOUT_MS)
            self._consumer = None
            self._finished = True

    def keep_alive(self) -> None:
        """Takes part in group rebalances without taking records; the reader calls it while back-pressured.

        kafka-python rebalances only inside poll(): a member that stops polling while it holds partitions
        (its loader's queue full, its trainer waiting for another worker) makes every other member wait up to
        max_poll_interval_ms (5 min) for them. So poll with every partition paused: nothing is fetched or
        returned, the position stays where the iteration left it, and a rebalance completes.
        """
        consumer = self._consumer
        if consumer is None or self._closed.is_set() or threading.get_ident() != self._owner:
            return
        kafka = self._kafka
        consumer.pause(*consumer.assignment())
        try:
            returned = consumer.poll(timeout_ms=0)
        except kafka.errors.KafkaError as err:
            self._failed("polling while back-pressured", err)
            returned = {}
        for tp, messages in returned.items():  # not expected with all paused; never drop a record if it happens
            if messages:
                consumer.seek(tp, messages[0].offset)
        with self._lock:
            waiting = self._unpositioned  # newly assigned: stay paused until the iterating loop has sought them
        ready = [tp for tp in consumer.assignment() if tp.topic == self.topic and tp.partition not in waiting]
        if ready:
            consumer.resume(*ready)

    # --- rebalance listener (kafka-python's I/O thread) ------------------------------------------

