"""The exporter's real output, for the tests that check names against it (dashboard, rules, promtool)."""

from __future__ import annotations

import re

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streamssl.monitoring.metrics import Metrics

# PromQL identifiers of our own metrics and the process/platform collectors' (label names and values do not match:
# quoted strings are removed first, and label names carry none of these prefixes).
METRIC_NAME = re.compile(r"\b(?:streamssl|process|python)_[A-Za-z0-9_]*")


def observed_metrics() -> Metrics:
    """A Metrics after everything a run reports at least once: a step and its logs, a Kafka batch, a reject,
    an eval, a checkpoint, a publish and a refused one."""
    metrics = Metrics("moco")
    metrics.observe_step(32, 0.05, 0.03)
    metrics.observe_logs({"loss": 6.9, "queue_fill": 0.5, "embedding_std": 0.08, "positive_similarity": 0.7})
    metrics.observe_source({"records": 320.0, "rejected": 1.0, "commits": 2.0, "commit_failures": 0.0,
                            "broker_retries": 0.0, "rebalances": 1.0, "assigned_partitions": 2.0, "lag": 30.0,
                            "lag_p0": 10.0, "lag_p2": 20.0}, "images", 3)
    metrics.observe_source({"cycle": 0.0, "shard_index": 1.0, "shards_pending": 4.0})
    metrics.rejected.labels(reason="corrupt_image").inc()
    metrics.eval_seconds.observe(3.2)
    metrics.knn_top1.set(0.77)
    metrics.samples_per_second.set(500)
    metrics.observe_checkpoint(0.2)
    metrics.observe_publish(1)
    metrics.publish_refused.labels(reason="collapsed").inc()
    metrics.embedding_drift.set(0.51)
    return metrics


def exposition(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def served_names(metrics: Metrics) -> set[str]:
    """Every sample name the exporter serves (with its _total/_bucket/_sum/_count/_created suffix)."""
    return {sample.name for family in text_string_to_metric_families(exposition(metrics)) for sample in family.samples}


def referenced_names(expr: str) -> set[str]:
    """The streamssl_/process_/python_ metric names a PromQL expression reads."""
    return set(METRIC_NAME.findall(re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)))
