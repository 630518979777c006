"""Dead letters: every skipped record or shard is appended to RUN_DIR/dead-letter.jsonl and counted.

Bad input never stops a run, but it is never silently dropped either: one JSON line per
rejection (time, source, key, reason, detail) and `streamssl_records_rejected_total{reason}`.
With a Kafka source the rejected record's bytes can also be produced to a dead-letter topic
(`forward`), so they can be inspected or replayed where they came from. Written on the loop's thread
alone: the rejects every feed hands it, and those a task makes itself (a series point out of order).
`reject` is a `RejectFn`, so anything that reports bad input can report it here.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from streamssl.monitoring.metrics import Metrics
from streamssl.streams.records import RejectFn

log = logging.getLogger(__name__)


def private(path: str | os.PathLike[str], flags: int) -> int:
    """An `open(..., opener=private)` that creates the file 0600: run-dir files hold record keys and bytes."""
    return os.open(path, flags, 0o600)


class DeadLetters:
    def __init__(self, path: Path, metrics: Metrics | None = None, forward: RejectFn | None = None) -> None:
        self.path = Path(path)
        self.metrics = metrics
        self.forward = forward
        self.counts: dict[str, int] = {}

    def reject(self, source: str, key: str, reason: str, detail: str = "", payload: bytes = b"") -> None:
        entry = {"time": time.time(), "source": source, "key": key, "reason": reason, "detail": detail[:500]}
        self.counts[reason] = self.counts.get(reason, 0) + 1
        with open(self.path, "a", encoding="utf-8", opener=private) as handle:
            handle.write(json.dumps(entry) + "\n")
        if self.metrics is not None:
            self.metrics.rejected.labels(reason=reason).inc()
        if self.forward is not None:
            self.forward(source, key, reason, detail, payload)
        log.warning("skipped %s %s: %s %s", source, key, reason, detail)
