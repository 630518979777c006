"""What the exporter serves besides the training gauges: the process's own metrics, build info, Kafka counters and
per-partition lag (from a real source on a real broker), the loader's queue depth, a worker's rank; and
`promtool check metrics` finds nothing to lint."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from functools import partial
from importlib import metadata
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from streamssl.monitoring.build_info import SOURCE_ROOT, git_sha
from streamssl.monitoring.metrics import Metrics
from streamssl.pipeline.collective import Collective
from streamssl.pipeline.images import Trainer
from streamssl.pipeline.loading.loader import BatchLoader
from streamssl.streams.kafka_produce import lake_records, produce
from streamssl.streams.webdataset_source import WebDatasetSource
from tests.conftest import drain, free_port, tiny_config
from tests.kafka_broker import Tansu
from tests.monitoring.exposition import exposition, observed_metrics, served_names
from tests.streams.test_kafka_source import Reader, image, new_topic, source, wait_for


def _samples(metrics: Metrics) -> dict[str, float]:
    return {sample.name + str(sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(exposition(metrics)) for sample in family.samples}


def test_process_platform_and_build_info_are_in_the_runs_own_registry() -> None:
    names = served_names(Metrics("moco"))
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_start_time_seconds",
            "python_info", "python_gc_collections_total"} <= names
    values = _samples(Metrics("moco"))
    build = [key for key in values if key.startswith("streamssl_build_info")]
    assert len(build) == 1
    torch_version = metadata.version("torch")
    assert f"('torch', '{torch_version}')" in build[0] and f"('version', '{metadata.version('streamssl')}')" in build[0]
    if (SOURCE_ROOT / ".git").exists():  # a source checkout (CI, this repo): its commit
        head = subprocess.run(["git", "-C", str(SOURCE_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        assert f"('git_sha', '{head}')" in build[0]
    assert values["process_resident_memory_bytes[]"] > 10e6


def test_git_sha_is_empty_outside_a_checkout(tmp_path: Path) -> None:
    assert git_sha(tmp_path) == ""


def test_kafka_stats_become_counters_and_per_partition_lag() -> None:
    metrics = Metrics("moco")
    metrics.observe_source({"records": 100.0, "commits": 1.0, "broker_retries": 2.0, "assigned_partitions": 2.0,
                            "lag": 12.0, "lag_p0": 5.0, "lag_p3": 7.0}, "images")
    metrics.observe_source({"records": 160.0, "commits": 1.0, "broker_retries": 2.0, "assigned_partitions": 1.0,
                            "lag": 4.0, "lag_p3": 4.0}, "images")
    values = _samples(metrics)
    assert values["streamssl_kafka_records_total[('topic', 'images')]"] == 160
    assert values["streamssl_kafka_broker_retries_total[('topic', 'images')]"] == 2
    assert values["streamssl_kafka_assigned_partitions[('topic', 'images')]"] == 1
    assert values["streamssl_kafka_consumer_lag[('partition', '3'), ('topic', 'images')]"] == 4
    # partition 0 was revoked: its lag is gone, not frozen at 5
    assert not any("('partition', '0')" in key for key in values)
    # Kafka's fields are no longer squeezed into the generic gauge
    assert not any(key.startswith("streamssl_source_position") for key in values)
    # A restarted loader process reports its totals from 0 again: the counter keeps counting up.
    metrics.observe_source({"records": 30.0, "commits": 0.0}, "images")
    assert _samples(metrics)["streamssl_kafka_records_total[('topic', 'images')]"] == 190


def test_other_sources_keep_the_source_position_gauge() -> None:
    metrics = Metrics("moco")
    metrics.observe_source({"shard_index": 3.0, "rejected": 1.0, "rows": 64.0})  # a shard / Ray source: no topic
    values = _samples(metrics)
    assert values["streamssl_source_position[('field', 'shard_index')]"] == 3
    assert values["streamssl_source_position[('field', 'rejected')]"] == 1
    assert not any(key.startswith("streamssl_kafka_") for key in values)


def test_each_worker_serves_on_port_plus_rank_with_its_rank_on_every_sample(tmp_path: Path, small_lake: Path) -> None:
    # The rank alone is faked (no torch.distributed group): serve_metrics is what is under test, no collective runs.
    rank_one = Collective()
    rank_one.rank, rank_one.world_size = 1, 2
    port = free_port() - 1
    trainer = Trainer(tiny_config(tmp_path / "run", small_lake, f"metrics.port={port}"), collective=rank_one)
    try:
        trainer.serve_metrics()
        assert trainer.metrics_port == port + 1
        trainer.metrics.observe_step(32, 0.1, 0.01)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port + 1}/metrics", timeout=5).read().decode()
    finally:
        trainer.metrics.close()
    samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]
    assert len(samples) > 50 and all(sample.labels.get("rank") == "1" for sample in samples)
    assert any(sample.name == "streamssl_steps_total" and sample.value == 1 for sample in samples)
    assert "rank" not in str(_samples(Metrics("moco")))  # a single-process run has no rank label


def test_loader_queue_depth_fills_while_the_trainer_waits_and_empties_when_drained(small_lake: Path) -> None:
    loader = BatchLoader(partial(WebDatasetSource, str(small_lake), mode="once"), None, 32, "png", 1, 28, prefetch=2)
    deadline = time.monotonic() + 30
    while loader.queued_batches < 2 and time.monotonic() < deadline:  # it decodes ahead while nothing is taken
        time.sleep(0.1)
    time.sleep(1.0)  # and stops at its prefetch bound
    depth = loader.queued_batches
    messages = drain(loader, 60)
    assert 2 <= depth < 20  # bounded: not the whole finite stream of 20 batches
    assert len(messages) == 21 and loader.queued_batches == 0


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not on PATH (`make tools` installs it)")
def test_promtool_finds_nothing_to_lint_in_the_exporters_output() -> None:
    for metrics in (observed_metrics(), Metrics("moco", rank=3)):
        done = subprocess.run(["promtool", "check", "metrics"], input=exposition(metrics), capture_output=True,
                              text=True, timeout=30, check=False)
        assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done.stdout + done.stderr


def test_a_real_kafka_sources_stats_map_to_counters_and_lag_of_every_assigned_partition(kafka_broker: Tansu) -> None:
    topic = new_topic(kafka_broker, partitions=4)
    assert produce([kafka_broker.bootstrap], topic, [(f"k{index}", image("PNG"), []) for index in range(100)]) == 100
    reader = Reader(source(kafka_broker, topic, f"g-{topic}"))
    try:  # once everything is read the source goes on polling, and refreshes its lag from the broker
        wait_for(lambda: len(reader.records) == 100 and "lag_p3" in reader.stream.stats())
        stats = reader.stream.stats()
    finally:
        reader.stop()
    metrics = Metrics("moco")
    metrics.observe_source(stats, topic)
    values = _samples(metrics)
    assert values[f"streamssl_kafka_records_total[('topic', '{topic}')]"] == 100
    assert values[f"streamssl_kafka_assigned_partitions[('topic', '{topic}')]"] == 4
    assert values[f"streamssl_kafka_rebalances_total[('topic', '{topic}')]"] >= 1
    lagging = {key for key in values if key.startswith("streamssl_kafka_consumer_lag")}
    assert lagging == {f"streamssl_kafka_consumer_lag[('partition', '{partition}'), ('topic', '{topic}')]"
                       for partition in range(4)}
    assert not any(key.startswith("streamssl_source_position") for key in values)  # every field was Kafka's own


@pytest.mark.slow  # ~1-2 min on 2 busy cores: a group join, a trainer and a checkpointed Kafka run
def test_a_kafka_run_exports_its_topics_counters_through_the_loop(kafka_broker: Tansu, small_lake: Path,
                                                                   tmp_path: Path) -> None:
    topic = new_topic(kafka_broker, partitions=4)
    records = list(lake_records(str(small_lake)))[:320]
    assert produce([kafka_broker.bootstrap], topic, records) == 320
    trainer = Trainer(tiny_config(tmp_path / "run", kafka_broker.url(topic), "kafka.session_timeout_ms=6000",
                                  f"kafka.group=g-{topic}", "train.max_steps=3"))
    trainer.run()
    values = _samples(trainer.metrics)
    assert values[f"streamssl_kafka_records_total[('topic', '{topic}')]"] >= 3 * 32
    assert values[f"streamssl_kafka_assigned_partitions[('topic', '{topic}')]"] == 4
    assert not any(key.startswith("streamssl_source_position") for key in values)
