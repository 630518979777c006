"""Dead letters: every skipped record or shard is appended to RUN_DIR/dead-letter.jsonl and counted.

Bad input never stops a run, but it is never silently dropped either: one JSON line per
rejection (time, source, key, reason, detail) and `streamssl_records_rejected_total{reason}`.
With a Kafka source the rejected record's bytes can also be produced to a dead-letter topic
(`forward`), so they can be inspected or replayed where they came from. Called from the loader
thread and from the source, hence the lock.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from streamssl.monitoring.metrics import Metrics

log = logging.getLogger(__name__)


# forward(source, key, reason, detail, payload): e.g. streams.kafka_produce.DeadLetterTopic.send
Forward = Callable[[str, str, str, str, bytes], None]


class DeadLetters:
    def __init__(self, path: Path, metrics: Metrics | None = None, forward: Forward | None = None) -> None:
        self.path = Path(path)
        self.metrics = metrics
        self.forward = forward
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def reject(self, source: str, key: str, reason: str, detail: str = "", payload: bytes = b"") -> None:
        entry = {"time": time.time(), "source": source, "key": key, "reason": reason, "detail": detail[:500]}
        with self._lock:
            self.counts[reason] = self.counts.get(reason, 0) + 1
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")
        if self.metrics is not None:
            self.metrics.rejected.labels(reason=reason).inc()
        if self.forward is not None:
            self.forward(source, key, reason, detail, payload)
        log.warning("skipped %s %s: %s %s", source, key, reason, detail)
