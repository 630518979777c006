"""Publish notifications reach a loopback webhook and a real Kafka topic (Tansu); failures are retried, counted and
never stop the run."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from streamssl.pipeline.loop import Loop
from streamssl.streams.kafka_produce import create_topic, kafka_module
from tests.conftest import free_port
from tests.kafka_broker import Tansu
from tests.pipeline.encoder_task import EncoderTask, config


class Webhook:
    """A loopback HTTP server answering POSTs with the next of `statuses` (then 200), keeping what 200 received."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses, self.received, self.attempts = list(statuses), list[dict[str, Any]](), 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.attempts += 1
                status = hook.statuses.pop(0) if hook.statuses else 200
                if status == 200:
                    assert self.headers["Content-Type"] == "application/json"
                    hook.received.append(json.loads(body))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None: ...

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/publish"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook(request: pytest.FixtureRequest) -> Iterator[Webhook]:
    hook = Webhook(getattr(request, "param", []))
    yield hook
    hook.close()


def check_event(event: dict[str, Any], run_dir: Path) -> None:
    folder = run_dir / "published" / event["name"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert event["manifest_sha256"] == hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()
    assert event["path"] == str(folder.resolve()) and event["event"] == "published"
    for key in ("version", "step", "samples_seen", "metrics", "created_at"):
        assert event[key] == manifest[key]


def notify_failures(loop: Loop, target: str) -> float:
    return loop.metrics.registry.get_sample_value("streamssl_publish_notify_failures_total", {"target": target}) or 0.0


def test_every_publish_is_posted_to_the_webhook(tmp_path: Path, webhook: Webhook, one_thread: None) -> None:
    loop = Loop(config(tmp_path, "train.max_steps=4", "publish.gate=false", f"publish.webhook={webhook.url}"),
                EncoderTask({0: {"knn_top1": 0.7}}))
    loop.run()
    assert [event["name"] for event in webhook.received] == ["v000001", "v000002"]
    for event in webhook.received:
        check_event(event, tmp_path)
    assert webhook.received[1]["metrics"] == {"knn_top1": 0.7} and webhook.received[1]["step"] == 4


@pytest.mark.parametrize("webhook", [[503, 500]], indirect=True)
def test_a_failing_webhook_is_retried_with_backoff(tmp_path: Path, webhook: Webhook, one_thread: None) -> None:
    loop = Loop(config(tmp_path, "train.max_steps=2", "publish.gate=false", f"publish.webhook={webhook.url}"),
                EncoderTask())
    loop.run()
    assert webhook.attempts == 3 and [event["name"] for event in webhook.received] == ["v000001"]
    assert notify_failures(loop, "webhook") == 0


@pytest.mark.parametrize("webhook", [[404]], indirect=True)
def test_a_refused_or_unreachable_webhook_is_counted_and_the_run_goes_on(
        tmp_path: Path, webhook: Webhook, one_thread: None, caplog: pytest.LogCaptureFixture) -> None:
    # 404: the URL is wrong, asking again will not help; then a port nothing listens on, retried
    loop = Loop(config(tmp_path, "train.max_steps=2", "publish.gate=false", f"publish.webhook={webhook.url}"),
                EncoderTask())
    state = loop.run()
    assert state.step == 2 and webhook.attempts == 1 and notify_failures(loop, "webhook") == 1
    started = time.monotonic()
    dead = f"http://127.0.0.1:{free_port()}/"
    loop = Loop(config(tmp_path, "train.max_steps=4", "publish.gate=false", f"publish.webhook={dead}",
                       "publish.retries=1", "publish.timeout_seconds=1"), EncoderTask())
    assert loop.run().step == 4 and notify_failures(loop, "webhook") == 1
    assert time.monotonic() - started < 20
    assert any("publish notification of v000002 to webhook failed: URLError" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "published" / "LATEST").read_text() == "v000002\n"


def test_every_publish_is_an_event_on_the_kafka_topic(tmp_path: Path, kafka_broker: Tansu, one_thread: None) -> None:
    topic = "published-events"
    create_topic(kafka_broker.bootstrap, topic, partitions=1)
    loop = Loop(config(tmp_path, "train.max_steps=4", "publish.gate=false", f"publish.topic={topic}",
                       f"publish.bootstrap={kafka_broker.bootstrap}"), EncoderTask({0: {"knn_top1": 0.7}}))
    loop.run()
    assert notify_failures(loop, "kafka") == 0
    consumer = kafka_module().KafkaConsumer(topic, bootstrap_servers=kafka_broker.bootstrap,
                                            auto_offset_reset="earliest", consumer_timeout_ms=10000)
    try:
        records = []
        for record in consumer:
            records.append(record)
            if len(records) == 2:
                break
    finally:
        consumer.close()
    assert [record.key for record in records] == [b"v000001", b"v000002"]
    for record in records:
        check_event(json.loads(record.value), tmp_path)


def test_a_kafka_broker_that_is_down_is_counted_and_the_run_goes_on(tmp_path: Path, one_thread: None) -> None:
    loop = Loop(config(tmp_path, "train.max_steps=2", "publish.gate=false", "publish.topic=published-events",
                       f"publish.bootstrap=127.0.0.1:{free_port()}", "publish.retries=0", "publish.timeout_seconds=1"),
                EncoderTask())
    assert loop.run().step == 2 and notify_failures(loop, "kafka") == 1
    assert (tmp_path / "published" / "LATEST").read_text() == "v000001\n"
