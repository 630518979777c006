"""kafka_produce against a real broker (Tansu): spec parsing, topics, rate and limit, lake records, backoff."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any

import pytest

from streamssl.streams.kafka_produce import (
    create_topic,
    kafka_module,
    lake_records,
    parse_kafka_url,
    produce,
)
from streamssl.streams.records import SourceError
from streamssl.streams.webdataset_source import WebDatasetSource
from tests.conftest import LAKE_IMAGES, free_port
from tests.kafka_broker import Tansu

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_topic(broker: Tansu, topic: str, expected: int, seconds: float = 10.0) -> list[Any]:
    """Every message of `topic` by direct partition assignment (no consumer group, so no slow group join)."""
    kafka = kafka_module()
    consumer = kafka.KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False)
    try:
        partitions = [kafka.TopicPartition(topic, partition) for partition in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        messages: list[Any] = []
        deadline = time.monotonic() + seconds
        while len(messages) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                messages.extend(batch)
        # One more poll: a message beyond `expected` (sent twice, say) must show up in the count too.
        messages.extend(message for batch in consumer.poll(timeout_ms=300).values() for message in batch)
        return messages
    finally:
        consumer.close(autocommit=False)


def numbered(prefix: str) -> Iterator[tuple[str, bytes, list[tuple[str, bytes]]]]:
    for index in count():
        yield f"{prefix}{index}", b"value-%d" % index, [("n", str(index).encode())]


def test_parse_kafka_url() -> None:
    assert parse_kafka_url("kafka://localhost:9092/events") == (["localhost:9092"], "events", {})
    assert parse_kafka_url("kafka://a.example:9093,10.0.0.2:9094,[::1]:9095/fmnist.v2_x-1?group=trainers") == (
        ["a.example:9093", "10.0.0.2:9094", "[::1]:9095"], "fmnist.v2_x-1", {"group": "trainers"})
    for bad in ("localhost:9092/events", "kafka://localhost/events", "kafka://localhost:0/events",
                "kafka://localhost:9092", "kafka://localhost:9092/a b", "kafka://localhost:9092/events?group=",
                "kafka://user:secret@localhost:9092/events", "kafka://localhost:9092/events#x"):
        with pytest.raises(SourceError):
            parse_kafka_url(bad)


def test_create_topic_is_idempotent(kafka_broker: Tansu) -> None:
    topic = f"p-{uuid.uuid4().hex[:12]}"
    assert create_topic([kafka_broker.bootstrap], topic, partitions=3) is True
    assert create_topic([kafka_broker.bootstrap], topic, partitions=3) is False
    consumer = kafka_module().KafkaConsumer(bootstrap_servers=kafka_broker.bootstrap)
    try:
        assert consumer.partitions_for_topic(topic) == {0, 1, 2}
    finally:
        consumer.close()


def test_produce_respects_rate_and_limit(kafka_broker: Tansu) -> None:
    topic = f"p-{uuid.uuid4().hex[:12]}"
    create_topic([kafka_broker.bootstrap], topic)
    started = time.monotonic()
    assert produce([kafka_broker.bootstrap], topic, numbered("r"), rate=400, limit=200) == 200
    elapsed = time.monotonic() - started
    assert 199 / 400 <= elapsed < 5.0  # the 200th record may leave 199/400 s after the first
    started = time.monotonic()
    assert produce([kafka_broker.bootstrap], topic, numbered("u"), limit=300) == 300
    assert time.monotonic() - started < 199 / 400  # no rate: not paced
    messages = read_topic(kafka_broker, topic, 500)
    assert len(messages) == 500
    assert sorted(message.key for message in messages if message.key.startswith(b"r")) == sorted(
        b"r%d" % index for index in range(200))
    first = next(message for message in messages if message.key == b"u7")
    assert first.value == b"value-7" and first.headers == [("n", b"7")]


def test_lake_records_carry_png_and_label(small_lake: Path, kafka_broker: Tansu) -> None:
    records = list(lake_records(str(small_lake)))
    assert len(records) == LAKE_IMAGES
    lake = {record.key: record for record in WebDatasetSource(str(small_lake), mode="once")}
    assert [key for key, _, _ in records] == list(lake)  # lake order, every record once
    for key, png, headers in records:
        assert png.startswith(PNG_MAGIC) and png == lake[key].fields["png"]
        assert headers == [("label", str(json.loads(lake[key].fields["json"])["label"]).encode())]

    topic = f"p-{uuid.uuid4().hex[:12]}"
    create_topic([kafka_broker.bootstrap], topic)
    assert produce([kafka_broker.bootstrap], topic, lake_records(str(small_lake)), limit=64) == 64
    messages = read_topic(kafka_broker, topic, 64)
    assert sorted(message.key.decode() for message in messages) == [key for key, _, _ in records[:64]]
    assert len({message.partition for message in messages}) == 4  # keys spread over the partitions
    assert all(dict(message.headers)["label"].isdigit() for message in messages)


def test_unreachable_broker_is_a_source_error() -> None:
    quick = {"bootstrap_timeout_ms": 300}
    with pytest.raises(SourceError, match="cannot reach Kafka"):
        produce([f"127.0.0.1:{free_port()}"], "t", numbered("x"), limit=1, client_options=quick)
    with pytest.raises(SourceError, match="cannot reach Kafka"):
        create_topic([f"127.0.0.1:{free_port()}"], "t", client_options=quick)
    with pytest.raises(SourceError, match="no Kafka bootstrap host name resolves"):  # at once, not after 30 s
        produce(["no-such-host.invalid:9092"], "t", numbered("x"), limit=1)
    with pytest.raises(SourceError):
        produce(["127.0.0.1:9092"], "t", numbered("x"), rate=-1)


def test_backoff_is_jittered_within_half_and_all_of_the_delay() -> None:
    from streamssl.streams.kafka_produce import jittered

    waits = [jittered(4.0) for _ in range(200)]
    assert all(2.0 <= wait <= 4.0 for wait in waits)
    assert len(set(waits)) > 100  # group members that failed together do not retry together
