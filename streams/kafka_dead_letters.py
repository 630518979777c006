"""The dead-letter topic: records a Kafka run could not use, produced back to Kafka through a durable outbox.

`send` never waits on the broker: it appends the message to an outbox file in the run dir (one JSON line, the
bytes in base64) and returns. A thread forwards the outbox to the topic in order, and a cursor file next to it
says how far the broker has acknowledged it. So a broker that is down, when the run starts or later, only delays
the forwarding, and a restart forwards what the last run left. The outbox is bounded (`max_bytes` not yet
acknowledged): past that, a dead letter is counted in `dropped` and kept in dead-letter.jsonl only. Delivery is
at least once: a crash between the broker's acknowledgement and the cursor write sends those messages again.

Each message keeps the record's key and bytes; headers "reason", "detail" and "source" say what was wrong and
where it came from, so it can be inspected or replayed. The outbox holds record bytes: it is created 0600.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from streamssl.streams.files import atomic_write
from streamssl.streams.kafka_produce import check_resolvable, jittered, kafka_module

log = logging.getLogger(__name__)

OUTBOX_MAX_BYTES = 64 * 2**20  # not yet acknowledged: ~20k dead 3 KB images
BATCH_BYTES = 2**20  # read from the outbox and sent in one go
# The forwarding thread's bounds on one broker call: sends never wait long for a broker that is down.
PRODUCER_DEFAULTS = {"bootstrap_timeout_ms": 5000, "max_block_ms": 5000}


def outbox_path(run_dir: Path, rank: int = 0) -> Path:
    """The outbox of worker `rank` (every worker of a group forwards its own)."""
    return Path(run_dir) / ("dead-letter-outbox.jsonl" if rank == 0 else f"dead-letter-outbox-rank{rank}.jsonl")


class DeadLetterTopic:
    """Forwards dead letters to `topic` via the outbox file `outbox`; `send`, `flush` and `close` never raise.

    Args:
        bootstrap: Bootstrap servers of the cluster (the source's).
        topic: The dead-letter topic.
        outbox: The outbox file (`outbox_path(run_dir)`); its cursor is `OUTBOX.cursor`.
        client_options: Passed to kafka-python's KafkaProducer (security settings, client_id, ...).
        max_bytes: Bound on the outbox's bytes not yet acknowledged.
        retry_backoff_seconds, max_backoff_seconds: The wait after a failed broker call, doubling up to the cap.
    """

    def __init__(self, bootstrap: list[str] | str, topic: str, outbox: Path, client_options: dict[str, Any] | None = None,
                 *, max_bytes: int = OUTBOX_MAX_BYTES, retry_backoff_seconds: float = 0.5,
                 max_backoff_seconds: float = 30.0) -> None:
        check_resolvable(bootstrap)
        self.topic, self.max_bytes = topic, max_bytes
        self.sent = 0  # acknowledged by the broker
        self.dropped = 0  # not buffered: the outbox was full or could not be written
        self._kafka = kafka_module()
        self._options = {"bootstrap_servers": bootstrap, "acks": "all", **PRODUCER_DEFAULTS, **(client_options or {})}
        self._backoff = (retry_backoff_seconds, max_backoff_seconds)
        self._path, self._cursor_path = Path(outbox), Path(f"{outbox}.cursor")
        self._lock = threading.Lock()  # guards the file's size and the cursor between `send` and the thread
        self._wake, self._stop = threading.Event(), threading.Event()
        self._file = os.fdopen(os.open(self._path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600), "r+b", buffering=0)
        self._closed = False
        self._size = self._drop_partial_line()
        self._cursor = self._read_cursor()
        self._synced = self._cursor
        self._thread = threading.Thread(target=self._forward, name="streamssl-dead-letters", daemon=True)
        self._thread.start()

    @property
    def pending_bytes(self) -> int:
        """Outbox bytes the broker has not acknowledged yet."""
        with self._lock:
            return self._size - self._cursor

    # --- the training side -------------------------------------------------------------------------
    def send(self, key: str, value: bytes, reason: str, detail: str = "", source: str = "") -> None:
        """Appends one message to the outbox and returns at once; the thread forwards it."""
        line = (json.dumps({"key": key, "value": base64.b64encode(value).decode(), "reason": reason,
                            "detail": detail, "source": source}) + "\n").encode()
        with self._lock:
            if self._size - self._cursor + len(line) > self.max_bytes:
                self._drop(key, f"the outbox holds {self.max_bytes} bytes the broker has not acknowledged")
                return
            try:
                self._file.write(line)  # unbuffered: in the OS's hands, so a crash of this process loses nothing
            except (OSError, ValueError) as err:  # ValueError: written after close
                self._drop(key, f"the outbox cannot be written ({err})")
                return
            self._size += len(line)
        self._wake.set()

    def _drop(self, key: str, why: str) -> None:
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 1000 == 0:
            log.warning("dead-letter topic %s: %d dead letter(s) not forwarded (latest %s): %s; dead-letter.jsonl "
                        "has them", self.topic, self.dropped, key, why)

    def flush(self, timeout: float = 10.0) -> bool:
        """Waits until the outbox is forwarded, at most `timeout` seconds; whether it was."""
        deadline = time.monotonic() + timeout
        while self.pending_bytes and time.monotonic() < deadline and self._thread.is_alive():
            self._wake.set()
            time.sleep(0.05)
        return not self.pending_bytes

    def close(self, timeout: float = 5.0) -> None:
        """Forwards what it can within `timeout`; the rest stays in the outbox for the next run."""
        if not self.flush(timeout):
            log.warning("dead-letter topic %s: %d bytes of dead letters not forwarded yet; they stay in %s for the "
                        "next run", self.topic, self.pending_bytes, self._path)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=PRODUCER_DEFAULTS["max_block_ms"] / 1000 + 2)
        with self._lock:
            self._closed = True
            if not self._thread.is_alive():  # else it may still use the file: the process's exit closes it
                self._file.close()

    # --- the outbox file ---------------------------------------------------------------------------
    def _drop_partial_line(self) -> int:
        """Cuts a line a crash left half-written (its dead letter is in dead-letter.jsonl); returns the size."""
        size = self._file.seek(0, os.SEEK_END)
        tail = max(size - BATCH_BYTES, 0)
        self._file.seek(tail)
        chunk = self._file.read()
        if chunk and not chunk.endswith(b"\n"):
            size = tail + chunk.rfind(b"\n") + 1
            self._file.truncate(size)
        return size

    def _read_cursor(self) -> int:
        try:
            cursor = int(json.loads(self._cursor_path.read_text())["offset"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0  # none yet, or unreadable: forward everything (at least once)
        return cursor if 0 <= cursor <= self._size else 0

    def _write_cursor(self, cursor: int) -> None:
        with atomic_write(self._cursor_path) as handle:
            handle.write(json.dumps({"offset": cursor}).encode())

    def _read_batch(self) -> list[tuple[int, dict[str, Any] | None]]:
        """Outbox entries from the cursor on, each with the offset right after it (None: a line that is no entry)."""
        with self._lock:
            if self._closed or self._cursor == self._size:
                return []
            start, end = self._cursor, min(self._size, self._cursor + BATCH_BYTES)
            self._file.seek(start)
            data = self._file.read(end - start)
            while b"\n" not in data and end < self._size:  # one entry longer than a batch: read it whole
                more = self._file.read(BATCH_BYTES)
                data, end = data + more, end + len(more)
        if self._synced < end:  # durable before it is forwarded; fsync here, never on the training thread
            os.fsync(self._file.fileno())
            self._synced = end
        if end < self._size and b"\n" in data:
            data = data[:data.rfind(b"\n") + 1]  # whole lines only
        entries: list[tuple[int, dict[str, Any] | None]] = []
        offset = start
        for line in data.splitlines(keepends=True):
            offset += len(line)
            entry: dict[str, Any] | None
            try:
                entry = json.loads(line)
                entry["value"] = base64.b64decode(entry["value"], validate=True)
            except (ValueError, KeyError, TypeError, binascii.Error):
                log.warning("dead-letter outbox %s: skipped a line that is not a dead letter", self._path)
                entry = None
            entries.append((offset, entry))
        return entries

    def _acknowledged(self, cursor: int, count: int) -> None:
        """Moves the cursor past what the broker acknowledged (durably, off the training thread's path); empties a
        fully forwarded outbox."""
        self._write_cursor(cursor)
        with self._lock:
            self._cursor = cursor
            self.sent += count
            drained = self._cursor == self._size
        if not drained:
            return
        self._write_cursor(0)  # first: a crash before the truncation only sends them again
        with self._lock:
            if self._cursor == self._size and not self._closed:  # else appended meanwhile: the next cursor write fixes it
                self._file.truncate(0)
                self._cursor = self._size = self._synced = 0

    # --- the forwarding thread ---------------------------------------------------------------------
    def _forward(self) -> None:
        errors = self._kafka.errors
        producer, backoff = None, self._backoff[0]
        while not self._stop.is_set():
            try:
                batch = self._read_batch()
                if not batch:
                    self._wake.wait(1.0)
                    self._wake.clear()
                    continue
                try:
                    producer = producer or self._kafka.KafkaProducer(**self._options)
                    cursor, count = self._send(producer, batch)
                except errors.KafkaError as err:
                    log.warning("dead-letter topic %s: %s; retrying in about %.1f s", self.topic, type(err).__name__,
                                backoff)
                    cursor, count = self._cursor, 0
                    _discard(producer)  # what it still buffers would arrive twice
                    producer = None
                if cursor != self._cursor:
                    self._acknowledged(cursor, count)
                done = cursor == batch[-1][0]
            except OSError as err:  # the run dir's disk (full?): the outbox waits
                log.warning("dead-letter outbox %s: %s; retrying in about %.1f s", self._path, err, backoff)
                done = False
            if done:
                backoff = self._backoff[0]
            else:
                self._stop.wait(jittered(backoff))
                backoff = min(backoff * 2, self._backoff[1])
        _discard(producer)

    def _send(self, producer: Any, batch: list[tuple[int, dict[str, Any] | None]]) -> tuple[int, int]:
        """Sends a batch and waits for the broker (until the producer's delivery timeout, or a stop); returns the
        cursor after the acknowledged prefix and how many messages that prefix holds."""
        errors = self._kafka.errors
        futures = []
        for offset, entry in batch:
            future = None
            if entry is not None:
                key = str(entry["key"])
                headers = [(name, str(entry.get(name, "")).encode("utf-8", "backslashreplace"))
                           for name in ("reason", "detail", "source")]
                try:
                    future = producer.send(self.topic, key=key.encode("utf-8", "backslashreplace"),
                                           value=entry["value"], headers=headers)
                except errors.MessageSizeTooLargeError as err:  # would never fit: skipped, not retried
                    with self._lock:
                        self._drop(key, str(err))
            futures.append((offset, future))
        while not self._stop.is_set():
            try:
                producer.flush(timeout=1.0)
                break
            except errors.KafkaTimeoutError:
                continue
        cursor, count = self._cursor, 0
        for offset, future in futures:
            if future is not None:
                if not future.is_done:
                    break
                if future.failed():
                    if getattr(future.exception, "retriable", False):  # e.g. the broker gone: sent again later
                        break
                    with self._lock:  # refused for good (too large for the broker, not authorised, ...)
                        self._drop(f"at outbox offset {offset}", str(future.exception))
                else:
                    count += 1
            cursor = offset
        return cursor, count


def _discard(producer: Any) -> None:
    """Closes a producer without waiting for what it buffers."""
    if producer is not None:
        with contextlib.suppress(Exception):
            producer.close(timeout=0)
