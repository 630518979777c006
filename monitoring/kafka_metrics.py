"""A Kafka source's counters and per-partition lag as Prometheus counters and a labelled gauge.

The source reports running totals (`records`, `commits`, …) and `lag_pN` per assigned partition in one flat
dict (streams/kafka_source.py `stats()`). Totals become counters, incremented by what they grew since the
last report; a total that went down means a new source (the loader process was restarted), which counts
from zero again, so its whole value is new. Lag becomes `streamssl_kafka_consumer_lag{topic,partition}`,
and a partition no longer assigned (a rebalance, the end of a run) is removed rather than left frozen.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

# stats field → (counter name without _total, help)
COUNTERS = {
    "records": ("streamssl_kafka_records", "Records read from Kafka (good and rejected)."),
    "rejected": ("streamssl_kafka_rejected", "Kafka records the source could not parse (also in records_rejected)."),
    "commits": ("streamssl_kafka_commits", "Offset commits to the broker (after a durable checkpoint)."),
    "commit_failures": ("streamssl_kafka_commit_failures", "Offset commits that failed and will be retried."),
    "broker_retries": ("streamssl_kafka_broker_retries", "Failed broker calls retried after a backoff."),
    "rebalances": ("streamssl_kafka_rebalances", "Partition assignments that changed."),
}
LAG_PREFIX = "lag_p"


class KafkaMetrics:
    """The Kafka part of a source's stats; `observe` returns the fields that are not Kafka's own."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.counters = {field: Counter(name, text, ["topic"], registry=registry)
                         for field, (name, text) in COUNTERS.items()}
        self.assigned = Gauge("streamssl_kafka_assigned_partitions", "Partitions this consumer reads.", ["topic"],
                              registry=registry)
        self.lag = Gauge("streamssl_kafka_consumer_lag",
                         "Records behind the partition's end offset (refreshed at most every 5 s).",
                         ["topic", "partition"], registry=registry)
        self._totals: dict[tuple[str, str], float] = {}
        self._lagging: set[tuple[str, str]] = set()

    def observe(self, stats: dict[str, float], topic: str) -> dict[str, float]:
        rest: dict[str, float] = {}
        lagging: set[tuple[str, str]] = set()
        for field, value in stats.items():
            if field in self.counters:
                last = self._totals.get((topic, field), 0.0)
                self.counters[field].labels(topic=topic).inc(value - last if value >= last else value)
                self._totals[(topic, field)] = value
            elif field.startswith(LAG_PREFIX):
                partition = field[len(LAG_PREFIX):]
                self.lag.labels(topic=topic, partition=partition).set(value)
                lagging.add((topic, partition))
            elif field == "assigned_partitions":
                self.assigned.labels(topic=topic).set(value)
            elif field != "lag":  # the total is sum(streamssl_kafka_consumer_lag)
                rest[field] = value
        for gone in self._lagging - lagging:
            self.lag.remove(*gone)
        self._lagging = lagging
        return rest
