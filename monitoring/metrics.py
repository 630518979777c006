"""Prometheus metrics of a training run, and the HTTP exporter that serves them.

Every run owns its own `CollectorRegistry`, so several runs (or tests) in one process never
collide; the process, platform and GC collectors are added to it. Names follow Prometheus conventions:
`streamssl_` prefix, base units (`_seconds`, ratios in 0..1), `_total` for counters (`promtool check
metrics` finds nothing to lint). The trainer pushes values in; nothing here knows about models or streams.
Each worker of a multi-worker run serves its own, every sample labelled with its `rank`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from streamssl.monitoring.build_info import build_labels
from streamssl.monitoring.kafka_metrics import KafkaMetrics

# Not among the ports of the usual exporters (Prometheus 9090, Pushgateway 9091, Alertmanager
# 9093, node 9100, mysqld 9104, blackbox 9115, OpenTelemetry 9464, Grafana 3000).
DEFAULT_METRICS_PORT = 9765

# Step times of small CPU nets are tens of ms, of ResNets on CPU seconds.
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Ranked:
    """A registry's metrics with a `rank` label on every sample: one exporter per worker of a multi-worker run."""

    def __init__(self, registry: CollectorRegistry, rank: int) -> None:
        self.inner, self.rank = registry, str(rank)

    def collect(self) -> Iterator[Metric]:
        for family in self.inner.collect():
            family.samples = [sample._replace(labels={**sample.labels, "rank": self.rank}) for sample in family.samples]
            yield family


class Metrics:
    """All gauges, counters and histograms a run exports, and the process's own (memory, CPU, GC, Python).

    Args:
        method: The run's method (a label of `streamssl_run_info`).
        rank: A worker's rank in a multi-worker run: every sample then carries it as the `rank` label.
    """

    def __init__(self, method: str = "", rank: int | None = None) -> None:
        r = CollectorRegistry()
        # A registry of its own has none of the global one's defaults unless they are added to it.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.registry = r
        if rank is not None:
            self.registry = CollectorRegistry()
            self.registry.register(Ranked(r, rank))
        self.samples = Counter("streamssl_samples", "Samples trained on.", registry=r)
        self.steps = Counter("streamssl_steps", "Optimizer steps taken.", registry=r)
        self.skipped_steps = Counter(
            "streamssl_skipped_steps", "Steps skipped because the loss was not finite.", registry=r
        )
        self.rollbacks = Counter(
            "streamssl_rollbacks", "Returns to the last checkpoint after repeated non-finite losses.", registry=r
        )
        self.step_seconds = Histogram(
            "streamssl_step_duration_seconds", "Wall time of one training step (augment + forward + backward).",
            buckets=STEP_BUCKETS, registry=r,
        )
        self.wait_seconds = Counter(
            "streamssl_input_wait_seconds", "Time the trainer waited for the next batch from the stream.", registry=r
        )
        self.loss = Gauge("streamssl_loss", "Training loss of the last step.", registry=r)
        self.learning_rate = Gauge("streamssl_learning_rate", "Learning rate of the last step.", registry=r)
        self.samples_per_second = Gauge(
            "streamssl_samples_per_second", "Training throughput over the last progress interval.", registry=r
        )
        self.knn_top1 = Gauge("streamssl_knn_top1_ratio", "Weighted kNN top-1 accuracy of the monitor (0..1).", registry=r)
        self.queue_fill = Gauge("streamssl_queue_fill_ratio", "Fill of the method's queue or memory bank (0..1).", registry=r)
        self.embedding_std = Gauge(
            "streamssl_embedding_std",
            "Mean per-dimension std of L2-normalised embeddings; ~1/sqrt(d) healthy, 0 means collapse.", registry=r,
        )
        self.method_stat = Gauge(
            "streamssl_method_stat", "Other values a method reports, by name.", ["stat"], registry=r
        )
        self.checkpoint_seconds = Histogram(
            "streamssl_checkpoint_duration_seconds", "Time to write one checkpoint durably.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r,
        )
        self.last_checkpoint = Gauge(
            "streamssl_last_checkpoint_timestamp_seconds", "Unix time of the last durable checkpoint.", registry=r
        )
        self.checkpoint_age = Gauge(
            "streamssl_checkpoint_age_seconds", "Seconds since the last durable checkpoint (since start if none).",
            registry=r,
        )
        self._last_checkpoint_time = time.time()
        self.checkpoint_age.set_function(lambda: time.time() - self._last_checkpoint_time)
        self.last_publish = Gauge(
            "streamssl_last_publish_timestamp_seconds", "Unix time of the last published encoder.", registry=r
        )
        self.published_version = Gauge("streamssl_published_version", "Last published encoder version.", registry=r)
        self.publish_failures = Counter(
            "streamssl_publish_failures", "Publishes that failed to write (a full disk, a read-only mount).", registry=r
        )
        self.publish_mirror_failures = Counter(
            "streamssl_publish_mirror_failures", "Publish mirror uploads that failed (retried at the next publish).",
            registry=r,
        )
        self.publish_refused = Counter(
            "streamssl_publish_refused", "Encoders not published, by reason (older lineage, collapsed, regressed).",
            ["reason"], registry=r,
        )
        self.publish_notify_failures = Counter(
            "streamssl_publish_notify_failures", "Publish notifications not delivered after every retry, by target.",
            ["target"], registry=r,
        )
        self.eval_seconds = Histogram(
            "streamssl_eval_duration_seconds", "Wall time of one in-run eval (the kNN monitor).",
            buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r,
        )
        self.embedding_drift = Gauge(
            "streamssl_embedding_drift", "Drift of recent stream embeddings from the reference window (0.5 = none).",
            registry=r,
        )
        self.rejected = Counter(
            "streamssl_records_rejected", "Records or shards skipped as bad input, by reason.", ["reason"], registry=r
        )
        self.source_position = Gauge(
            "streamssl_source_position", "Stream position and lag as the source reports it, by field.", ["field"],
            registry=r,
        )
        self.source_idle = Gauge(
            "streamssl_source_idle_seconds",
            "Seconds since the trainer last took a message from the stream (since start if none): grows while a "
            "followed lake has nothing new or a topic is quiet.", registry=r,
        )
        self._last_message_time = time.monotonic()
        self.source_idle.set_function(lambda: time.monotonic() - self._last_message_time)
        self.info = Gauge("streamssl_run_info", "Constant 1, labelled with the run's method.", ["method"], registry=r)
        self.info.labels(method=method).set(1)
        self.build_info = Gauge("streamssl_build_info", "Constant 1, labelled with what the run was built from.",
                                ["version", "git_sha", "torch"], registry=r)
        self.build_info.labels(**build_labels()).set(1)
        self.loader_queue = Gauge(
            "streamssl_loader_queue_batches", "Decoded batches waiting for the trainer (prefetch queue depth).", registry=r
        )
        self.kafka = KafkaMetrics(r)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def observe_step(self, samples: int, seconds: float, learning_rate: float) -> None:
        self.samples.inc(samples)
        self.steps.inc()
        self.step_seconds.observe(seconds)
        self.learning_rate.set(learning_rate)

    def observe_logs(self, logs: dict[str, float]) -> None:
        """Exports a method's logs: well-known names to their own gauges, the rest by name."""
        named = {"loss": self.loss, "queue_fill": self.queue_fill, "embedding_std": self.embedding_std}
        for name, value in logs.items():
            gauge = named.get(name)
            (gauge if gauge is not None else self.method_stat.labels(stat=name)).set(value)

    def observe_checkpoint(self, seconds: float) -> None:
        self._last_checkpoint_time = time.time()
        self.checkpoint_seconds.observe(seconds)
        self.last_checkpoint.set(self._last_checkpoint_time)

    def observe_publish(self, version: int) -> None:
        self.last_publish.set(time.time())
        self.published_version.set(version)

    def observe_source(self, stats: dict[str, float], topic: str = "", queued_batches: int | None = None) -> None:
        """A message's source stats (a Kafka source's, with its `topic`, to the kafka metrics) and the loader's queue
        depth; called for every message the trainer takes."""
        self._last_message_time = time.monotonic()
        for field, value in (self.kafka.observe(stats, topic) if topic else stats).items():
            self.source_position.labels(field=field).set(value)
        if queued_batches is not None:
            self.loader_queue.set(queued_batches)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Starts the exporter in a daemon thread and returns the port it is bound to."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
