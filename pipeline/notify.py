"""Publish notifications: one JSON event per published version, to a Kafka topic and/or a webhook URL.

The event (`publish_event`) says which version, where it is, the sha256 of its manifest.json (which holds the
weights' sha256, so it pins the whole version), its metrics, step, samples seen and creation time. A thread
delivers the events in order, each target retried with doubling backoff; a target that still fails is logged and
counted (`streamssl_publish_notify_failures_total{target}`), and the run goes on: a notification is a courtesy,
the published folder and LATEST are the truth a consumer can always poll.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import Counter

from streamssl.models.encoder_io import MANIFEST_FILE
from streamssl.pipeline.config import Config, ConfigError
from streamssl.pipeline.loading.sources import source_spec
from streamssl.streams.kafka_produce import jittered, kafka_module, parse_kafka_url
from streamssl.streams.records import SourceError

log = logging.getLogger(__name__)

QUEUE_EVENTS = 64  # events waiting for delivery; more only while every target is down for ~64 publishes
FIRST_BACKOFF_SECONDS = 0.5


def publish_event(folder: Path) -> dict[str, Any]:
    """The event announcing the version in `folder`, from its manifest.json as written."""
    raw = (folder / MANIFEST_FILE).read_bytes()
    manifest = json.loads(raw)
    return {"event": "published", "version": manifest.get("version"), "name": folder.name,
            "path": str(folder.resolve()), "manifest_sha256": hashlib.sha256(raw).hexdigest(),
            **{key: manifest.get(key) for key in ("metrics", "step", "samples_seen", "created_at", "method")}}


def kafka_bootstrap(cfg: Config) -> str:
    """publish.bootstrap, else the Kafka data source's servers ("" when neither)."""
    spec = source_spec(cfg.data)
    return cfg.publish.bootstrap or (",".join(spec.bootstrap) if spec.kind == "kafka" else "")


def check_targets(cfg: Config) -> None:
    """ConfigError for a malformed publish.webhook, publish.topic or publish.bootstrap, or a topic with no servers."""
    publish = cfg.publish
    if publish.timeout_seconds <= 0:
        raise ConfigError(f"publish.timeout_seconds must be > 0, got {publish.timeout_seconds}")
    if publish.webhook:
        parts = urlsplit(publish.webhook)
        if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in publish.webhook):
            raise ConfigError(f"publish.webhook must be an http:// or https:// URL with a host, got {publish.webhook!r}")
    if publish.bootstrap and not publish.topic:
        raise ConfigError("publish.bootstrap is set but publish.topic is not: set the topic the events go to")
    if publish.topic:
        bootstrap = kafka_bootstrap(cfg)
        if not bootstrap:
            raise ConfigError("publish.topic needs Kafka servers: set publish.bootstrap (the data source is not Kafka)")
        try:
            parse_kafka_url(f"kafka://{bootstrap}/{publish.topic}")
        except SourceError as err:
            raise ConfigError(f"publish.topic / publish.bootstrap: {err}") from None


class Notifier:
    """Delivers `send`'s events to the configured targets from a daemon thread; never raises into the run."""

    def __init__(self, cfg: Config, failures: Counter) -> None:
        self.cfg, self.failures = cfg.publish, failures
        self.targets: list[tuple[str, Callable[[bytes, str], None]]] = []
        if self.cfg.topic:
            self.bootstrap, self.client_options = kafka_bootstrap(cfg).split(","), cfg.kafka.client_options()
            self.targets.append(("kafka", self._to_kafka))
        if self.cfg.webhook:
            self.targets.append(("webhook", self._to_webhook))
        self._producer: Any = None
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue(QUEUE_EVENTS)
        self._thread: threading.Thread | None = None

    def send(self, event: dict[str, Any]) -> None:
        if not self.targets:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._deliver_all, name="streamssl-publish-notify", daemon=True)
            self._thread.start()
        try:
            self._events.put_nowait(event)
        except queue.Full:
            self._failed([name for name, _ in self.targets], event, "the notification queue is full")

    def close(self) -> None:
        """Delivers what is queued, waiting at most as long as one event's every retry may take."""
        if self._thread is None:
            return
        self._events.put(None)
        attempts = self.cfg.retries + 1
        self._thread.join(attempts * self.cfg.timeout_seconds + FIRST_BACKOFF_SECONDS * 2**attempts + 1)
        if self._thread.is_alive():  # the daemon thread dies with the process
            log.warning("publish notifications: %d not delivered by the end of the run", self._events.qsize())
        elif self._producer is not None:
            self._producer.close(timeout=self.cfg.timeout_seconds)

    def _deliver_all(self) -> None:
        while (event := self._events.get()) is not None:
            body = json.dumps(event, sort_keys=True).encode()
            for name, deliver in self.targets:
                error = self._with_retries(deliver, body, str(event.get("name", "")))
                if error:
                    self._failed([name], event, error)

    def _with_retries(self, deliver: Callable[[bytes, str], None], body: bytes, key: str) -> str:
        """"" once `deliver` succeeded, else the last error after every retry."""
        error = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(jittered(FIRST_BACKOFF_SECONDS * 2 ** (attempt - 1)))
            try:
                deliver(body, key)
                return ""
            except Exception as err:  # whatever a broker or server does, the run goes on
                error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
                if isinstance(err, urllib.error.HTTPError) and 400 <= err.code < 500 and err.code not in (408, 429):
                    break  # the server refuses this request: asking again will not help
        return error

    def _failed(self, targets: list[str], event: dict[str, Any], error: str) -> None:
        for target in targets:
            self.failures.labels(target=target).inc()
            log.warning("publish notification of %s to %s failed: %s", event.get("name"), target, error)

    def _to_webhook(self, body: bytes, key: str) -> None:
        request = urllib.request.Request(self.cfg.webhook, data=body, method="POST",
                                         headers={"Content-Type": "application/json", "User-Agent": "streamssl"})
        with urllib.request.urlopen(request, timeout=self.cfg.timeout_seconds) as response:  # http(s): check_targets
            response.read()

    def _to_kafka(self, body: bytes, key: str) -> None:
        if self._producer is None:
            timeout_ms = int(self.cfg.timeout_seconds * 1000)
            self._producer = kafka_module().KafkaProducer(
                bootstrap_servers=self.bootstrap, acks="all", bootstrap_timeout_ms=timeout_ms, max_block_ms=timeout_ms,
                **self.client_options)
        try:
            self._producer.send(self.cfg.topic, value=body, key=key.encode()).get(timeout=self.cfg.timeout_seconds)
        except Exception:
            self._producer.close(timeout=0)  # a fresh connection for the retry
            self._producer = None
            raise
