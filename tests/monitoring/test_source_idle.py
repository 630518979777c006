"""streamssl_source_idle_seconds: how long the trainer has had nothing from the stream."""

from __future__ import annotations

import time

from streamssl.monitoring.metrics import Metrics


def test_idle_seconds_grow_until_the_next_message() -> None:
    metrics = Metrics("moco")

    def idle() -> float:
        value = metrics.registry.get_sample_value("streamssl_source_idle_seconds")
        assert value is not None
        return value

    time.sleep(0.2)
    assert idle() >= 0.2  # since start: nothing has arrived yet
    metrics.observe_source({"shards_pending": 0.0})
    assert idle() < 0.2
    time.sleep(0.3)
    assert idle() >= 0.3
    metrics.observe_source({})
    assert idle() < 0.3
