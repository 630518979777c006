"""KafkaSource against a real broker (Tansu): exactly-once reading, resume, consumer groups, rebalance, broker crash."""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import pytest
from PIL import Image

from streamssl.streams.kafka_produce import create_topic, kafka_module, produce
from streamssl.streams.kafka_source import KafkaSource, sniff
from streamssl.streams.records import Record, SourceError
from tests.kafka_broker import Tansu

SESSION_MS = 6000  # Tansu completes a group's first join after about half of it


def new_topic(broker: Tansu, partitions: int = 4) -> str:
    topic = f"t-{uuid.uuid4().hex[:12]}"
    create_topic([broker.bootstrap], topic, partitions=partitions)
    return topic


def source(broker: Tansu, topic: str, group: str, **options: object) -> KafkaSource:
    return KafkaSource(broker.url(topic), group=group, session_timeout_ms=SESSION_MS, **options)


def take(stream: KafkaSource, count: int, seconds: float = 20.0) -> list[Record]:
    """The next `count` records; closes the source after `seconds`, so a missing record fails the test instead of hanging."""
    timer = threading.Timer(seconds, stream.close)
    timer.start()
    records: list[Record] = []
    try:
        for record in stream:
            records.append(record)
            if len(records) == count:
                break
    finally:
        timer.cancel()
    return records


def offsets(records: Iterable[Record]) -> list[tuple[str, int]]:
    return [(record.source, record.index) for record in records]


def assert_complete(read: Iterable[tuple[str, int]], topic: str, total: int) -> None:
    """Every partition's offsets are 0..n-1 without gaps, and together there are `total`: nothing lost."""
    by_partition: dict[str, set[int]] = {}
    for where, offset in read:
        assert where.startswith(f"kafka://{topic}/")
        by_partition.setdefault(where, set()).add(offset)
    assert sum(len(seen) for seen in by_partition.values()) == total
    for where, seen in by_partition.items():
        assert seen == set(range(len(seen))), f"gap in {where}"


class Reader:
    """Iterates a source on its own thread, as the loader does; `stop()` closes it from this thread."""

    def __init__(self, stream: KafkaSource) -> None:
        self.stream = stream
        self.records: list[Record] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for record in self.stream:
            self.records.append(record)

    def stop(self) -> float:
        """Closes the source from this thread; returns how long the iterating thread took to finish."""
        started = time.monotonic()
        self.stream.close()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()
        return time.monotonic() - started


def wait_for(condition: Callable[[], object], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def image(kind: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 7).save(buffer, format=kind)
    return buffer.getvalue()


def test_sniff_by_magic_bytes_and_json_objects() -> None:
    assert [sniff(image(kind)) for kind in ("PNG", "JPEG", "WEBP")] == ["png", "jpg", "webp"]
    assert sniff(b' {"series_id": "a", "timestamp": 1, "value": 2.5}') == "json"
    assert [sniff(value) for value in (b"[1, 2]", b"{not json", b"\x00\xff", b"{\xff}", b"[" * 100000)] == ["bin"] * 5


def test_reads_every_offset_once_with_sniffed_fields_and_headers(kafka_broker: Tansu) -> None:
    topic = new_topic(kafka_broker)
    values = {"png": image("PNG"), "jpg": image("JPEG"), "webp": image("WEBP"),
              "json": b'{"series_id": "s1", "timestamp": 1700000000, "value": 0.25}', "bin": b"\x00garbage\xff"}
    kinds = list(values)
    messages = [(f"k{index}", values[kinds[index % 5]], [("label", str(index % 10).encode())]) for index in range(200)]
    # No key: the "id" header names it.
    messages.append(("", values["png"], [("id", b"from-header"), ("label", b"3")]))
    assert produce([kafka_broker.bootstrap], topic, messages) == 201

    stream = source(kafka_broker, topic, f"g-{topic}")
    records = take(stream, 201)
    stats = stream.stats()
    stream.close()

    assert_complete(offsets(records), topic, 201)
    by_key = {record.key: record for record in records}
    assert len(by_key) == 201
    for index in range(200):
        fields = by_key[f"k{index}"].fields
        kind = kinds[index % 5]
        assert fields == {kind: values[kind], "label": str(index % 10).encode()}
    assert by_key["from-header"].fields == {"png": values["png"], "id": b"from-header", "label": b"3"}
    assert stats["records"] == 201 and stats["assigned_partitions"] == 4 and stats["broker_retries"] == 0
    state = stream.state_dict()
    assert state["kind"] == "kafka" and state["topic"] == topic
    assert sum(state["offsets"].values()) == 201  # next offsets: one past every partition's last record


def test_empty_values_are_rejected_and_passed_over(kafka_broker: Tansu) -> None:
    topic = new_topic(kafka_broker, partitions=1)
    producer = kafka_module().KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all")
    for key, value in ((b"tombstone", None), (b"empty", b""), (b"garbage", b"\x13\x37"), (None, b'{"a": 1}')):
        producer.send(topic, key=key, value=value)
    producer.flush()
    producer.close()
    rejected: list[tuple[str, str, str]] = []
    stream = source(kafka_broker, topic, f"g-{topic}", on_reject=lambda *why: rejected.append(why[:3]))
    records = take(stream, 2)
    stream.close()
    assert rejected == [(f"kafka://{topic}/0", "tombstone", "empty_value"), (f"kafka://{topic}/0", "empty", "empty_value")]
    assert [(record.key, record.fields, record.index) for record in records] == [
        ("garbage", {"bin": b"\x13\x37"}, 2), (f"{topic}/0/3", {"json": b'{"a": 1}'}, 3)]
    assert stream.state_dict()["offsets"] == {"0": 4}
    assert stream.stats()["rejected"] == 2


class _RawHeaderName(str):
    """A header name whose bytes on the wire are not UTF-8: kafka-python's producer writes `name.encode()`, and other
    clients (librdkafka's C strings) can send any bytes; the broker stores them as they are."""

    def encode(self, *args: object, **kwargs: object) -> bytes:
        return b"\xff\xfename"


@pytest.mark.timeout(60)  # before the fix kafka-python's poll spun for ever on the bad record
def test_a_record_kafka_python_cannot_parse_is_rejected_and_reading_goes_on(kafka_broker: Tansu) -> None:
    topic = new_topic(kafka_broker, partitions=1)
    # linger: the three records sent without waiting below must share one batch even when a loaded machine's sender
    # thread would otherwise ship the first alone (seen once under CI load: lost-4 then arrived readable)
    producer = kafka_module().KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all", linger_ms=300)
    producer.send(topic, key=b"good-0", value=b"v").get(timeout=10)
    producer.send(topic, key=b"bad-1", value=b"v", headers=[(_RawHeaderName("x"), b"1")]).get(timeout=10)
    producer.send(topic, key=b"good-2", value=b"v").get(timeout=10)
    # one batch: the bad record first, so the two after it cannot be parsed either (kafka-python reads a batch from
    # its start); the record in the next batch is read again
    for key, headers in ((b"bad-3", [(_RawHeaderName("x"), b"1")]), (b"lost-4", []), (b"lost-5", [])):
        producer.send(topic, key=key, value=b"v", headers=headers)
    producer.flush()
    producer.send(topic, key=b"good-6", value=b"v").get(timeout=10)
    producer.close()
    rejected: list[tuple[str, ...]] = []
    stream = source(kafka_broker, topic, f"g-{topic}", on_reject=lambda *why: rejected.append(why))
    records = take(stream, 3)
    stream.close()
    assert [(record.key, record.index) for record in records] == [("good-0", 0), ("good-2", 2), ("good-6", 6)]
    assert [(key, reason) for _, key, reason, _ in rejected] == [(f"{topic}/0/{offset}", "unreadable_record")
                                                                 for offset in (1, 3, 4, 5)]
    assert "UnicodeDecodeError" in rejected[0][3]
    assert stream.state_dict()["offsets"] == {"0": 7} and stream.stats()["rejected"] == 4


def test_resume_from_checkpoint_and_from_committed_offsets(kafka_broker: Tansu) -> None:
    topic, total = new_topic(kafka_broker), 160
    produce([kafka_broker.bootstrap], topic, ((f"k{index}", b"v%d" % index, []) for index in range(total)))
    group = f"g-{topic}"

    first = source(kafka_broker, topic, group)
    read_first = take(first, 50)
    checkpoint = first.state_dict()
    first.close()  # no commit: the group has no offsets yet

    second = source(kafka_broker, topic, group)
    second.load_state_dict(checkpoint)
    read_second = take(second, 40)
    later = second.state_dict()
    second.commit(later)  # as the trainer does once that checkpoint is durable
    second.close()
    assert set(offsets(read_first)).isdisjoint(offsets(read_second))
    assert second.committed_offsets() == {int(partition): offset for partition, offset in later["offsets"].items()}

    # A new run (empty state) in the same group starts at the committed offsets ...
    third = source(kafka_broker, topic, group)
    third.load_state_dict({})
    read_third = take(third, total - 90)
    third.close()
    assert_complete(offsets(read_first + read_second + read_third), topic, total)

    # ... and an older checkpoint does not rewind past them: max(checkpoint, committed).
    fourth = source(kafka_broker, topic, group)
    fourth.load_state_dict(checkpoint)
    assert Counter(offsets(take(fourth, total - 90))) == Counter(offsets(read_third))
    fourth.close()


LINEAGE, OTHER = "a" * 32, "b" * 32


@pytest.mark.parametrize(("mine", "committed", "metadata", "start"), [
    (10, 30, f"streamssl lineage={LINEAGE} step=6", (10, True)),  # our commit of a newer, lost checkpoint
    (None, 30, f"streamssl lineage={LINEAGE} step=6", (None, True)),  # not in the checkpoint: auto_offset_reset
    (10, 30, f"streamssl lineage={LINEAGE} step=4", (30, False)),  # not newer than the checkpoint resumed from
    (10, 30, f"streamssl lineage={OTHER} step=9", (30, False)),  # another run dir moved the partition on
    (10, 30, "", (30, False)), (10, 30, None, (30, False)),  # someone else's commit, without our metadata
    (10, 25, None, (10, True)),  # no metadata (Tansu drops it), but an offset this run dir committed for step 6
    (10, 25, f"streamssl lineage={OTHER} step=9", (25, False)),  # the same offset, by another run dir
    (40, 30, f"streamssl lineage={LINEAGE} step=6", (40, False)), (10, None, None, (10, False)),
])
def test_start_offset_sets_aside_only_this_run_dirs_commits_of_newer_checkpoints(
        mine: int | None, committed: int | None, metadata: str | None, start: tuple[int | None, bool]) -> None:
    from streamssl.streams.kafka_assignment import KafkaPosition, start_offset

    resumed = KafkaPosition("t", {0: 10}, LINEAGE, 4, newer_commits={0: (25,)})
    assert start_offset(resumed, 0, mine, committed, metadata) == start
    # A source that resumed from no checkpoint, or from one written before lineages, keeps the later of the two.
    for plain in (None, KafkaPosition("t", {0: 10})):
        assert start_offset(plain, 0, mine, committed, metadata)[0] == max(o for o in (mine, committed) if o is not None)


def test_a_resumed_source_does_not_start_at_its_own_commit_of_a_lost_checkpoint(kafka_broker: Tansu) -> None:
    topic = new_topic(kafka_broker, partitions=1)
    produce([kafka_broker.bootstrap], topic, ((f"k{index}", b"v", []) for index in range(60)))
    group = f"g-{topic}"
    first = source(kafka_broker, topic, group)
    take(first, 20)
    checkpoint = {**first.state_dict(), "lineage": LINEAGE, "step": 4}  # as the loop checkpoints it
    take(first, 20)
    first.commit({**first.state_dict(), "lineage": LINEAGE, "step": 6})  # then that checkpoint turns out unreadable
    first.close()
    assert first.committed_offsets() == {0: 40}

    def first_offset(state: dict[str, object]) -> int:
        stream = source(kafka_broker, topic, group)
        stream.load_state_dict(state)
        records = take(stream, 1)
        stream.close()
        return records[0].index

    # Journaled as this run dir's commit for step 6 (Tansu keeps no commit metadata): the checkpoint's offset wins.
    assert first_offset({**checkpoint, "newer_commits": {"0": [40]}}) == 20
    # Not known as ours: the later of the two, as another member (or run dir) may have moved the partition on.
    assert first_offset(checkpoint) == 40


def test_two_sources_split_partitions_and_a_late_joiner_loses_nothing(kafka_broker: Tansu) -> None:
    topic, total = new_topic(kafka_broker), 200
    produce([kafka_broker.bootstrap], topic, ((f"k{index}", b"v", []) for index in range(total)))
    group = f"g-{topic}"
    readers = [Reader(source(kafka_broker, topic, group)) for _ in range(2)]
    wait_for(lambda: sum(len(reader.records) for reader in readers) >= total)
    time.sleep(0.3)  # anything read twice would show up now
    parts = [{record.source for record in reader.records} for reader in readers]
    for reader in readers:
        reader.stop()
    assert parts[0] and parts[1] and parts[0].isdisjoint(parts[1])
    assert_complete(offsets(readers[0].records + readers[1].records), topic, total)

    # A rebalance while records keep arriving: the second member joins after the first has committed once.
    topic = new_topic(kafka_broker)
    group = f"g-{topic}"
    late_has_read = threading.Event()
    produced: list[int] = []

    def keep_producing() -> None:
        def messages() -> Iterable[tuple[str, bytes, list[tuple[str, bytes]]]]:
            index = 0
            while not late_has_read.is_set() or index % 50:  # stop some records after the late member started
                yield f"k{index}", b"v", []
                index += 1

        produced.append(produce([kafka_broker.bootstrap], topic, messages(), rate=100))

    producer = threading.Thread(target=keep_producing, daemon=True)
    producer.start()
    early = Reader(source(kafka_broker, topic, group))
    wait_for(lambda: len(early.records) >= 40)
    committed_at = len(early.records)
    early.stream.commit(early.stream.state_dict())
    wait_for(lambda: early.stream.stats()["commits"] >= 1)
    late = Reader(source(kafka_broker, topic, group))
    wait_for(lambda: late.records)
    late_has_read.set()
    producer.join(timeout=30)
    total = produced[0]
    wait_for(lambda: len({*offsets(early.records), *offsets(late.records)}) >= total)
    time.sleep(0.3)
    early.stop()
    late.stop()
    read = Counter(offsets(early.records + late.records))
    assert_complete(read, topic, total)
    assert early.stream.stats()["rebalances"] >= 2
    duplicates = sum(count - 1 for count in read.values())
    assert duplicates <= len(early.records) - committed_at  # only what was read after the last commit


def test_broker_crash_and_restart_mid_read(durable_kafka_broker: Tansu) -> None:
    broker = durable_kafka_broker
    topic = new_topic(broker)
    produce([broker.bootstrap], topic, ((f"a{index}", b"v", []) for index in range(200)))
    reader = Reader(source(broker, topic, f"g-{topic}", retry_backoff_seconds=0.2, max_backoff_seconds=1.0))
    wait_for(lambda: len(reader.records) >= 200)
    position = reader.stream.state_dict()

    broker.kill()
    reader.stream.commit(position)  # a checkpoint finished during the outage: the commit fails and is retried
    wait_for(lambda: reader.stream.stats()["broker_retries"] > 0)
    assert reader.thread.is_alive()
    broker.restart()
    produce([broker.bootstrap], topic, ((f"b{index}", b"v", []) for index in range(200)))
    wait_for(lambda: len(reader.records) >= 400, seconds=40)
    wait_for(lambda: reader.stream.stats()["commits"] >= 1)
    time.sleep(0.3)
    reader.stop()

    stats = reader.stream.stats()
    assert stats["broker_retries"] > 0 and stats["commit_failures"] > 0
    assert_complete(offsets(reader.records), topic, 400)
    assert len(reader.records) == 400  # the consumer went back to its own position: nothing read twice
    assert reader.stream.committed_offsets() == {int(key): value for key, value in position["offsets"].items()}


def test_close_from_another_thread_ends_a_waiting_iteration(kafka_broker: Tansu) -> None:
    topic = new_topic(kafka_broker)
    produce([kafka_broker.bootstrap], topic, ((f"k{index}", b"v", []) for index in range(20)))
    reader = Reader(source(kafka_broker, topic, f"g-{topic}"))
    wait_for(lambda: len(reader.records) == 20)  # then it waits on an empty poll
    time.sleep(0.3)
    assert reader.stop() < 1.5  # poll_timeout_ms=200 to notice, then the consumer leaves the group
    assert list(reader.stream) == []  # closed for good

    # A commit that arrives after the iteration ended (the final checkpoint's) is still performed by close().
    position = reader.stream.state_dict()
    reader.stream.commit(position)
    reader.stream.close()
    assert reader.stream.committed_offsets() == {int(key): value for key, value in position["offsets"].items()}


def test_loader_commits_its_final_checkpoint_position(kafka_broker: Tansu, small_lake: Path) -> None:
    from streamssl.pipeline.loading.loader import BatchLoader
    from streamssl.streams.kafka_produce import lake_records

    topic = new_topic(kafka_broker)
    produce([kafka_broker.bootstrap], topic, lake_records(str(small_lake)), limit=100)
    make_source = partial(KafkaSource, kafka_broker.url(topic), group=f"g-{topic}", session_timeout_ms=SESSION_MS)
    loader = BatchLoader(make_source, None, batch_size=32, image_field="png", channels=1, size=28)
    try:
        batches = [loader.next(timeout=20) for _ in range(3)]
        assert [tuple(batch.images.shape) for batch in batches] == [(32, 1, 28, 28)] * 3
        position = batches[-1].position
        assert sum(position.offsets.values()) == 96
        loader.commit(position)  # the checkpoint with it is durable; then the run stops
    finally:
        loader.close()
    committed = make_source().committed_offsets()
    assert committed == position.offsets


def test_split_sources_read_their_own_partitions_and_commit_for_the_group(kafka_broker: Tansu) -> None:
    # How --workers N shares a topic: no group membership, partition p to worker p % N, offsets to the group.
    topic, total = new_topic(kafka_broker, partitions=5), 250
    produce([kafka_broker.bootstrap], topic, ((f"k{index}", b"v", []) for index in range(total)))
    group = f"g-{topic}"
    readers = [Reader(source(kafka_broker, topic, group, split=(worker, 2))) for worker in range(2)]
    wait_for(lambda: sum(len(reader.records) for reader in readers) >= total, seconds=10)  # no group join to wait for
    time.sleep(0.3)  # anything read twice would show up now
    parts = [{int(record.source.rsplit("/", 1)[1]) for record in reader.records} for reader in readers]
    assert parts == [{0, 2, 4}, {1, 3}]
    assert_complete(offsets(readers[0].records + readers[1].records), topic, total)
    positions = [reader.stream.state_dict() for reader in readers]
    for reader, position in zip(readers, positions, strict=True):
        reader.stream.commit(position)
        wait_for(lambda stream=reader.stream: stream.stats()["commits"] >= 1)
        reader.stop()
    committed = readers[0].stream.committed_offsets()
    assert committed == {int(p): offset for position in positions for p, offset in position["offsets"].items()}
    assert sum(committed.values()) == total

    # Resumed with three workers from the merged position: each starts where its partitions were, nothing is re-read.
    more = 60
    produce([kafka_broker.bootstrap], topic, ((f"m{index}", b"v", []) for index in range(more)))
    merged = {"kind": "kafka", "topic": topic, "offsets": {str(p): offset for p, offset in committed.items()}}
    resumed = []
    for worker in range(3):
        stream = source(kafka_broker, topic, group, split=(worker, 3))
        stream.load_state_dict(merged)
        resumed.append(Reader(stream))
    wait_for(lambda: sum(len(reader.records) for reader in resumed) >= more, seconds=10)
    time.sleep(0.3)
    for reader in resumed:
        reader.stop()
    assert [{int(record.source.rsplit("/", 1)[1]) for record in reader.records} for reader in resumed] == \
        [{0, 3}, {1, 4}, {2}]
    assert sorted(record.key for reader in resumed for record in reader.records) == sorted(f"m{i}" for i in range(more))


def test_a_split_source_waits_for_its_topic_to_exist(kafka_broker: Tansu) -> None:
    topic = f"t-{uuid.uuid4().hex[:12]}"
    reader = Reader(source(kafka_broker, topic, f"g-{topic}", split=(0, 1), retry_backoff_seconds=0.1,
                           max_backoff_seconds=0.5))
    wait_for(lambda: reader.stream.stats()["broker_retries"] >= 2)  # looked for it, backing off
    assert not reader.records
    create_topic([kafka_broker.bootstrap], topic, partitions=2)
    produce([kafka_broker.bootstrap], topic, ((f"k{index}", b"v", []) for index in range(30)))
    wait_for(lambda: len(reader.records) >= 30)
    reader.stop()
    assert_complete(offsets(reader.records), topic, 30)


def test_a_split_with_more_workers_than_partitions_is_refused(kafka_broker: Tansu) -> None:
    topic = new_topic(kafka_broker, partitions=2)
    stream = source(kafka_broker, topic, f"g-{topic}", split=(2, 3))
    with pytest.raises(SourceError, match="2 partition\\(s\\), fewer than the 3 workers"):
        next(iter(stream))
    with pytest.raises(SourceError, match="0 <= worker < workers"):
        source(kafka_broker, topic, "g", split=(3, 3))


class RefusingConsumer:
    """Stands in for the consumer at commit time only: real Kafka raises CommitFailedError after a rebalance
    took the partitions away, and Tansu (the test broker) never does, so this fault cannot be produced for real here."""

    def __init__(self, error: Exception, held: Iterable[int]) -> None:
        self.error, self.held, self.commits = error, list(held), 0

    def assignment(self) -> set[object]:
        kafka = kafka_module()
        return {kafka.TopicPartition("t", partition) for partition in self.held}

    def commit(self, offsets: object, timeout_ms: int) -> None:
        self.commits += 1
        raise self.error


def test_a_refused_commit_is_counted_and_left_to_the_next_checkpoint() -> None:
    errors = kafka_module().errors
    stream = KafkaSource("kafka://127.0.0.1:9092/t")
    stream.commit({"kind": "kafka", "topic": "t", "offsets": {"0": 5, "1": 7, "2": 9}})
    refusing = RefusingConsumer(errors.CommitFailedError("partitions reassigned"), held=[0, 1])
    stream._perform_commits(refusing, force=True)
    # counted, not retried: those partitions may be someone else's now, and the next checkpoint commits afresh
    assert refusing.commits == 1 and stream.stats()["commit_failures"] == 1 and stream.stats()["broker_retries"] == 0
    stream._perform_commits(refusing, force=True)
    assert refusing.commits == 1

    # A broker error (an outage) instead keeps the request queued for a retry after a backoff.
    stream.commit({"kind": "kafka", "topic": "t", "offsets": {"0": 6}})
    failing = RefusingConsumer(errors.KafkaConnectionError("broker gone"), held=[0])
    stream._perform_commits(failing, force=True)
    assert stream.stats()["commit_failures"] == 2 and stream.stats()["broker_retries"] == 1
    stream._perform_commits(failing, force=True)
    assert failing.commits == 2  # the same request, tried again
    stream.close()


@pytest.mark.parametrize("spec", ["kafka://127.0.0.1/t", "kafka://127.0.0.1:9092/", "kafka://127.0.0.1:9092/a/b",
                                  "kafka://127.0.0.1:9092/t?grup=x", "http://127.0.0.1:9092/t",
                                  "kafka://no-such-host.invalid:9092/t"])
def test_bad_specs_raise_one_line_source_errors(spec: str) -> None:
    with pytest.raises(SourceError) as raised:
        KafkaSource(spec)
    assert "\n" not in str(raised.value)


def test_bad_settings_and_foreign_positions_raise_source_errors() -> None:
    with pytest.raises(SourceError, match="unknown Kafka client option"):
        KafkaSource("kafka://127.0.0.1:9092/t", client_options={"no_such_option": 1})
    with pytest.raises(SourceError, match="auto_offset_reset"):
        KafkaSource("kafka://127.0.0.1:9092/t", auto_offset_reset="none")
    stream = KafkaSource("kafka://127.0.0.1:9092/t?group=from-url", group="from-argument")
    assert stream.group == "from-url"
    with pytest.raises(SourceError):
        stream.load_state_dict({"mode": "cycle", "shard": "x.tar"})
    with pytest.raises(SourceError):
        stream.load_state_dict({"kind": "kafka", "topic": "other", "offsets": {}})
    stream.load_state_dict({"kind": "kafka", "topic": "t", "offsets": {"1": 5}})
    assert stream.state_dict() == {"kind": "kafka", "topic": "t", "offsets": {"1": 5}}
    stream.close()
    assert list(stream) == []


def test_a_back_pressured_member_still_hands_partitions_to_a_joiner(kafka_broker: Tansu) -> None:
    # The loader stops iterating while its queue is full (its trainer waits for another worker). Without
    # keep_alive the holder never lets go of its partitions and the joiner gets nothing (measured: nothing in
    # 25 s; under Ray Train the second worker waited max_poll_interval_ms, 5 min).
    topic = new_topic(kafka_broker)
    produce([kafka_broker.bootstrap], topic, ((f"k{index}", b"v", []) for index in range(400)))
    group = f"g-{topic}"
    holder = source(kafka_broker, topic, group)
    held = iter(holder)
    first = [next(held) for _ in range(10)]  # holds all four partitions now, then stops iterating
    joiner = Reader(source(kafka_broker, topic, group))
    deadline = time.monotonic() + 30
    while not joiner.records and time.monotonic() < deadline:
        holder.keep_alive()  # what the loader does every 0.1 s while its queue is full: no records taken
        time.sleep(0.1)
    assert joiner.records, "the joiner got no partition within 30 s"
    joiner.stop()
    holder.close()
    assert len(first) == 10
    # the joiner has its share, not everything: the holder still owns part of the topic
    assert 0 < len({record.source for record in joiner.records}) < 4


class RecordingConsumer(RefusingConsumer):
    """Stands in for the consumer at commit time: Tansu keeps no commit metadata (it answers None for it), so what a
    commit sends is read here."""

    def __init__(self, held: Iterable[int]) -> None:
        super().__init__(RuntimeError("unused"), held)
        self.requests: list[dict[object, object]] = []

    def commit(self, offsets: object, timeout_ms: int) -> None:
        self.requests.append(offsets)  # type: ignore[arg-type]


def test_a_commit_names_its_checkpoint_in_the_offset_metadata() -> None:
    stream = KafkaSource("kafka://127.0.0.1:9092/t")
    stream.commit({"kind": "kafka", "topic": "t", "offsets": {"0": 5, "1": 8}, "lineage": LINEAGE, "step": 6})
    consumer = RecordingConsumer(held=[0, 1])
    stream._perform_commits(consumer, force=True)
    (request,) = consumer.requests
    assert {tp.partition: (meta.offset, meta.metadata) for tp, meta in request.items()} == {  # type: ignore[attr-defined]
        0: (5, f"streamssl lineage={LINEAGE} step=6"), 1: (8, f"streamssl lineage={LINEAGE} step=6")}
    stream.close()
