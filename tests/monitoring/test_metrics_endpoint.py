"""The Prometheus endpoint serves the named metrics over real HTTP while a run trains."""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from streamssl.pipeline.images import Trainer
from tests.conftest import free_port, tiny_config

EXPECTED = {
    "streamssl_samples_total", "streamssl_steps_total", "streamssl_step_duration_seconds_bucket",
    "streamssl_loss", "streamssl_learning_rate", "streamssl_knn_top1_ratio", "streamssl_samples_per_second",
    "streamssl_queue_fill_ratio", "streamssl_embedding_std", "streamssl_checkpoint_age_seconds",
    "streamssl_checkpoint_duration_seconds_count", "streamssl_last_publish_timestamp_seconds",
    "streamssl_source_position", "streamssl_input_wait_seconds_total",
}


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {sample.name + (str(sorted(sample.labels.items())) if sample.labels else ""): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_endpoint_serves_live_values(tmp_path: Path, small_lake: Path) -> None:
    port = free_port()
    trainer = Trainer(tiny_config(tmp_path / "run", small_lake, f"metrics.port={port}", "checkpoint.every_steps=3",
                                  "train.log_every_seconds=0.2", "train.max_steps=1000"))
    thread = threading.Thread(target=trainer.run)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        values: dict[str, float] = {}
        while time.monotonic() < deadline:
            try:
                values = _scrape(port)
            except OSError:
                time.sleep(0.2)
                continue
            if values.get("streamssl_steps_total", 0) >= 7 and values.get("streamssl_published_version", 0) >= 2:
                break
            time.sleep(0.2)
    finally:
        trainer.stop.set()
        thread.join(timeout=60)
    names = {key.split("[")[0] for key in values}
    assert names >= EXPECTED, EXPECTED - names
    steps = values["streamssl_steps_total"]
    assert steps >= 7
    assert values["streamssl_samples_total"] == 32 * steps
    assert values["streamssl_step_duration_seconds_count"] == steps
    assert 0 < values["streamssl_learning_rate"] <= 0.06
    assert 0 < values["streamssl_queue_fill_ratio"] <= 1
    assert 0 < values["streamssl_embedding_std"] < 1
    assert values["streamssl_checkpoint_duration_seconds_count"] >= 2
    assert values["streamssl_last_publish_timestamp_seconds"] > time.time() - 120
    assert values["streamssl_checkpoint_age_seconds"] < 60
    assert values["streamssl_run_info[('method', 'moco')]"] == 1
    assert trainer.state.step >= steps
