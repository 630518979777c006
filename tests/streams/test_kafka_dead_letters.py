"""The dead-letter topic's outbox against a real broker (Tansu): forwarded in order, never waited on, kept across
a broker outage and a restart, bounded."""

from __future__ import annotations

import json
import stat
import time
import uuid
from pathlib import Path

from streamssl.streams.kafka_dead_letters import DeadLetterTopic, outbox_path
from streamssl.streams.kafka_produce import create_topic
from tests.conftest import free_port
from tests.kafka_broker import Tansu
from tests.streams.test_kafka_produce import read_topic

QUICK = {"bootstrap_timeout_ms": 500, "max_block_ms": 500, "request_timeout_ms": 1000, "retry_backoff_ms": 100}


def _headers(message: object) -> dict[str, bytes]:
    return dict(message.headers)  # type: ignore[attr-defined]


def test_dead_letters_keep_record_and_reason(kafka_broker: Tansu, tmp_path: Path) -> None:
    topic = f"dlt-{uuid.uuid4().hex[:12]}"
    create_topic([kafka_broker.bootstrap], topic, partitions=1)
    outbox = outbox_path(tmp_path)
    dead_letters = DeadLetterTopic([kafka_broker.bootstrap], topic, outbox)
    dead_letters.send("k1", b"\x00not an image", "corrupt_image", "cannot identify image file", "kafka://in/2")
    dead_letters.send("k2", b"", "missing_image")
    dead_letters.close()
    assert (dead_letters.sent, dead_letters.dropped, dead_letters.pending_bytes) == (2, 0, 0)
    messages = read_topic(kafka_broker, topic, 2)
    assert [(message.key, message.value, _headers(message)) for message in messages] == [
        (b"k1", b"\x00not an image",
         {"reason": b"corrupt_image", "detail": b"cannot identify image file", "source": b"kafka://in/2"}),
        (b"k2", b"", {"reason": b"missing_image", "detail": b"", "source": b""})]
    assert outbox.stat().st_size == 0  # forwarded: emptied
    assert stat.S_IMODE(outbox.stat().st_mode) == 0o600  # it holds record bytes


def test_a_broker_outage_delays_dead_letters_but_never_the_sender(durable_kafka_broker: Tansu, tmp_path: Path) -> None:
    broker, topic = durable_kafka_broker, "dlt-outage"
    create_topic([broker.bootstrap], topic, partitions=1)
    broker.kill()
    started = time.monotonic()
    dead_letters = DeadLetterTopic([broker.bootstrap], topic, outbox_path(tmp_path), QUICK)  # starts without a broker
    for index in range(5):
        dead_letters.send(f"down-{index}", b"bytes %d" % index, "corrupt_image")
    assert time.monotonic() - started < 1.0  # the old producer blocked up to 60 s on each of them
    dead_letters.close(timeout=1.0)
    assert dead_letters.sent == 0 and dead_letters.pending_bytes > 0  # left in the outbox for the next run

    broker.restart()
    again = DeadLetterTopic([broker.bootstrap], topic, outbox_path(tmp_path), QUICK)  # a restart forwards them
    assert again.flush(timeout=30)
    broker.kill()  # and an outage in the middle of a run: forwarded once the broker is back
    again.send("later", b"x", "not_json")
    time.sleep(1.0)
    broker.restart()
    assert again.flush(timeout=60)
    again.close()
    messages = read_topic(broker, topic, 6)
    # at least once, in order: one sent while the broker died may be acknowledged and yet sent again
    assert list(dict.fromkeys(message.key for message in messages)) == [b"down-%d" % i for i in range(5)] + [b"later"]
    assert {message.key: message.value for message in messages} == {
        **{b"down-%d" % index: b"bytes %d" % index for index in range(5)}, b"later": b"x"}


def test_the_outbox_is_bounded_and_a_half_written_line_is_cut(tmp_path: Path) -> None:
    outbox = outbox_path(tmp_path, rank=1)
    outbox.write_bytes(json.dumps({"key": "old", "value": "", "reason": "r", "detail": "", "source": ""}).encode()
                       + b"\n" + b'{"key": "torn')  # a crash in the middle of a line
    dead_letters = DeadLetterTopic([f"127.0.0.1:{free_port()}"], "t", outbox, QUICK, max_bytes=1000)
    for index in range(20):
        dead_letters.send(f"k{index}", b"\x00" * 100, "corrupt_image")
    assert 0 < dead_letters.pending_bytes <= 1000 and dead_letters.dropped > 0
    dead_letters.close(timeout=0.2)
    lines = outbox.read_bytes().splitlines()
    assert json.loads(lines[0])["key"] == "old" and len(lines) == 1 + 20 - dead_letters.dropped
    assert all(json.loads(line)["key"].startswith("k") for line in lines[1:])


def test_a_dead_letter_larger_than_a_read_batch_is_forwarded_whole(kafka_broker: Tansu, tmp_path: Path) -> None:
    from streamssl.streams import kafka_dead_letters

    topic = f"dlt-{uuid.uuid4().hex[:12]}"
    create_topic([kafka_broker.bootstrap], topic, partitions=1)
    big = bytes(range(256)) * 4000  # ~1 MB as base64: longer than the outbox's read batch
    assert len(big) * 4 // 3 > kafka_dead_letters.BATCH_BYTES
    dead_letters = DeadLetterTopic([kafka_broker.bootstrap], topic, outbox_path(tmp_path),
                                   {"max_request_size": 4 * 2**20})
    dead_letters.send("big", big, "corrupt_image")
    dead_letters.send("small", b"x", "corrupt_image")
    dead_letters.close(timeout=30)
    assert [(m.key, m.value) for m in read_topic(kafka_broker, topic, 2)] == [(b"big", big), (b"small", b"x")]
