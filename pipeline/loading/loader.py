"""Background decoding in a separate process: records → uint8 image batches tagged with their stream position.

A worker process (loader_worker.py) owns the source, decodes every image once and queues ready batches, so
the next batch waits while the model trains. A process, not a thread: tar parsing and decoding are Python
code holding the GIL, and a thread doing them stalls the trainer's op dispatch (measured: the stream-fed loop
ran at ~55% of in-memory speed with a loader thread on 2 cores).

Each batch carries the source's `position()` taken right after its last record: the trainer checkpoints that
position for the batch it has trained on, not for where the read-ahead is, so prefetching never costs
exactness. Rejected records travel back as `Reject` messages with a position of their own, so that dead
letters and their metric are written by the loop, as for every feed.

The loader process is crash-only. Messages come through a pipe whose write end only that process holds, so
its death (a native decoder's segfault, the OOM killer, kill -9) reads as end-of-file at once, even in the
middle of a message. It is then started again at the position of the last message handed out; if it died
while decoding a record, that record is dead-lettered as `decoder_crash` by the new process. Deaths in a
row with nothing handed out between end the run with one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing as mp
import queue
import signal
import time
from collections.abc import Callable
from typing import Any

from streamssl.pipeline.loading.loader_worker import Decoded, LoaderJob, run_loader
from streamssl.pipeline.loading.messages import End, Failure, Message, Reject
from streamssl.pipeline.loading.positions import Position, position_to_dict

log = logging.getLogger(__name__)

_CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT}
DEATHS_IN_A_ROW = 3  # restarts at one position before the loader gives up
CLOSE_SECONDS = 12.0  # how long close() lets the process flush its last commit before it is killed


class BatchLoader:
    """Hands out the messages of a source built by `make_source(on_reject=…)` in a worker process: `Batch`es,
    `Reject`s, then `End` for a finite stream, or a `Failure`.

    `next()` raises queue.Empty when nothing arrived within `timeout` (or the process was just restarted).
    """

    def __init__(self, make_source: Callable[..., Any], position: Position | None, batch_size: int,
                 image_field: str, channels: int, size: int, prefetch: int = 4, max_record_bytes: int = 0,
                 full_side: int = 0) -> None:
        # fork starts in milliseconds and needs nothing picklable; spawn where fork does not exist.
        self._context = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")
        self._job = LoaderJob(make_source, position, batch_size, image_field, channels, size, prefetch,
                              max_record_bytes, frozenset(), full_side)
        self._rejected: set[tuple[str, str]] = set()  # handed out since the last batch: a restart repeats them
        self._deaths = 0  # in a row, with nothing handed out between
        self._killed_on = -1  # the record being decoded at the last death
        self._last_commit: dict[str, Any] | None = None
        self._ended = False
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        context = self._context
        reader, writer = context.Pipe(duplex=False)
        # Lock-free shared values: a lock held by a process that dies would hang the other side.
        self._stop = context.Value("b", 0, lock=False)
        self._decoding = context.Value("q", -1, lock=False)
        # Batches the process queued, written by it alone; minus those received here, the prefetch queue's depth.
        self._produced = context.Value("q", 0, lock=False)
        self._received = 0
        self._commits = context.Queue()
        self._process = context.Process(target=run_loader, name="streamssl-loader", daemon=True,
                                        args=(self._job, writer, self._stop, self._decoding, self._commits, self._produced))
        self._process.start()
        writer.close()  # the process holds the only write end now: its death is end-of-file here
        self._connection = reader
        if self._last_commit is not None:  # the dead process may not have passed it on
            self._commits.put(self._last_commit)

    def next(self, timeout: float) -> Message:
        if self._ended:
            return End()
        deadline = time.monotonic() + timeout
        while True:
            try:
                if not self._connection.poll(max(0.0, deadline - time.monotonic())):
                    raise queue.Empty
                message = self._connection.recv()
            except (EOFError, OSError):
                return self._restart()
            if isinstance(message, Reject):
                if (message.source, message.key) in self._rejected:
                    continue  # a restarted process re-reads from the last position: this one is handed out already
                self._rejected.add((message.source, message.key))
            elif isinstance(message, Decoded):
                self._rejected.clear()
                self._received += 1
            if isinstance(message, Decoded | Reject):
                self._job = dataclasses.replace(self._job, position=message.position)
                self._deaths = 0
            self._ended = isinstance(message, End)
            return message.batch() if isinstance(message, Decoded) else message

    @property
    def queued_batches(self) -> int:
        """Decoded batches ready in the process's queue or the pipe, not handed out yet."""
        return max(self._produced.value - self._received, 0)

    def _restart(self) -> Message:
        """The process died: start a new one at the last position handed out, past the record it crashed on."""
        self._process.join(timeout=5)
        code, crashed_on = self._process.exitcode, self._decoding.value
        self._discard()
        self._deaths += 1
        # A crash signal while decoding is the record's doing; a kill (OOM killer, kill -9) is only when it
        # happens twice on the same record.
        blamed = crashed_on >= 0 and (-(code or 0) in _CRASH_SIGNALS or crashed_on == self._killed_on)
        self._killed_on = crashed_on
        if blamed and crashed_on not in self._job.skip:
            self._job = dataclasses.replace(self._job, skip=self._job.skip | {crashed_on})
            why = "while decoding a record, which is dead-lettered as decoder_crash"
        elif self._deaths >= DEATHS_IN_A_ROW:
            return Failure(f"the loader process died {self._deaths} times in a row at the same stream position "
                           f"(last exit code {code}); see the log above")
        else:
            why = "(killed?)"
        log.warning("loader process exited with code %s %s; restarting it at the last position handed out", code, why)
        self.restarts += 1
        self._start()
        raise queue.Empty

    def commit(self, position: Position | None) -> None:
        """Asks the source to commit `position` upstream (Kafka offsets); call only once it is durably checkpointed."""
        self._last_commit = position_to_dict(position)
        self._commits.put(self._last_commit)

    def _discard(self) -> None:
        self._connection.close()
        # Commit requests still unsent have no reader once the process is gone (and a source without `commit`
        # never reads them): without this, exit waits forever for their feeder thread to fill a full pipe.
        self._commits.cancel_join_thread()
        self._commits.close()

    def close(self) -> None:
        self._stop.value = 1
        # Drain while waiting: the process cannot exit until its queued messages are through the pipe.
        deadline = time.monotonic() + CLOSE_SECONDS
        while self._process.is_alive() and time.monotonic() < deadline:
            try:
                if self._connection.poll(0.05):
                    self._connection.recv()
            except (EOFError, OSError):
                break
        self._process.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._process.is_alive():
            self._process.kill()  # it ignores SIGTERM: the trainer alone decides when it stops
        self._process.join(timeout=5)
        with contextlib.suppress(OSError):
            self._discard()
