"""The loader process's side: source → decode → batches and rejects, sent to the trainer in stream order.

Everything here runs in the child process that `BatchLoader` (loader.py) starts. Before decoding a record the
process writes the record's id into shared memory (`decoding`), and clears it after: if a native decoder
crashes the process, the trainer reads which record did it, restarts the process at the last position it
handed out, and the new process dead-letters that record (`decoder_crash`) instead of decoding it again.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from streamssl.pipeline.loading.decode import decode_or_reason, payload, record_id
from streamssl.pipeline.loading.messages import Batch, End, Failure, Reject
from streamssl.pipeline.loading.positions import Position, position_to_dict
from streamssl.streams.records import SourceError


@dataclass(frozen=True)
class LoaderJob:
    """What one loader process reads and how it decodes (picklable, for the spawn start method)."""

    make_source: Callable[..., Any]
    position: Position | None
    batch_size: int
    image_field: str
    channels: int
    size: int
    prefetch: int
    max_record_bytes: int
    skip: frozenset[int]  # ids of records that crashed an earlier loader process: dead-lettered, not decoded
    full_side: int = 0  # > 0: images keep their aspect ratio (decode.py), batches are padded (`stack_images`)


@dataclass
class Decoded:
    """A batch as the loader process sends it: numpy, pickled by value (torch tensors would travel as shared-memory
    handles that die with this process if it exits before the trainer has read them)."""

    images: np.ndarray
    keys: list[str]
    position: Position | None
    source_stats: dict[str, float]
    ids: np.ndarray
    extents: np.ndarray | None = None

    def batch(self) -> Batch:
        extents = None if self.extents is None else torch.from_numpy(self.extents)
        return Batch(torch.from_numpy(self.images), self.keys, self.position, self.source_stats, torch.from_numpy(self.ids),
                     extents)


def stack_images(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """[B, C, H, W] and None when every image is the same square; else every image at the top left of the
    batch's largest height x width, its last row and column repeated into the rest (so bilinear sampling at an
    image's edge sees the edge), and each image's [height, width] (`BatchAugment` crops within it)."""
    shapes = {image.shape for image in images}
    if len(shapes) == 1 and images[0].shape[1] == images[0].shape[2]:
        return np.stack(images), None
    height, width = max(image.shape[1] for image in images), max(image.shape[2] for image in images)
    padded = [np.pad(image, ((0, 0), (0, height - image.shape[1]), (0, width - image.shape[2])), mode="edge")
              for image in images]
    return np.stack(padded), np.array([image.shape[1:] for image in images], dtype=np.int64)


class _Batcher:
    """Records decoded into batches, and rejects, queued in stream order.

    `resume_at` is the newest position with no decoded record waiting for its batch; a reject carries it (see
    `Reject`), so that a checkpoint taken right after a reject never skips the records read before it.
    """

    def __init__(self, job: LoaderJob, out: queue.Queue[Any], stop: Any, decoding: Any, produced: Any) -> None:
        self.job, self.out, self.stop, self.decoding, self.produced = job, out, stop, decoding, produced
        self.source: Any = None
        self.images: list[np.ndarray] = []
        self.keys: list[str] = []
        self.ids: list[int] = []
        self.resume_at = job.position

    def put(self, message: Any, keep_alive: bool = False) -> bool:
        """Puts `message` unless stopped first; while the queue is full, a Kafka source keeps its group (`keep_alive`)."""
        idle = getattr(self.source, "keep_alive", None) if keep_alive else None
        while not self.stop.value:
            try:
                self.out.put(message, timeout=0.1)
                self.produced.value += isinstance(message, Decoded)  # the trainer reads it as its queue's depth
                return True
            except queue.Full:
                if idle is not None:
                    idle()
        return False

    def on_reject(self, source: str, key: str, reason: str, detail: str = "", payload: bytes = b"") -> None:
        """The source's callback; it runs inside the source's own iteration, where a Kafka source must not poll."""
        self.reject(Reject(source, key, reason, detail, payload), keep_alive=False)

    def reject(self, rejected: Reject, keep_alive: bool = True) -> None:
        if not self.images:  # every record read so far is in a batch or rejected: the stream may move past this one
            self.resume_at = self.source.position()
        rejected.position = self.resume_at
        self.put(rejected, keep_alive)

    def decode(self, record: Any) -> None:
        job = self.job
        rid = record_id(record.key)
        if rid in job.skip:
            why = "the image decoder crashed the loader process on this record"
            self.reject(Reject(record.source, record.key, "decoder_crash", why, payload(record, job.image_field)))
            return
        self.decoding.value = rid
        try:
            image, reason, detail = decode_or_reason(record, job.image_field, job.channels, job.size,
                                                     job.max_record_bytes, job.full_side)
        finally:
            self.decoding.value = -1
        if image is None:
            self.reject(Reject(record.source, record.key, reason, detail, payload(record, job.image_field)))
            return
        self.images.append(image)
        self.keys.append(record.key)
        self.ids.append(rid)

    def run(self, records: Any) -> bool:
        """Decodes records into batches on the queue; True at the end of a finite stream, False when stopped."""
        for record in records:
            self.decode(record)
            if len(self.images) == self.job.batch_size:
                self.resume_at = self.source.position()
                images, extents = stack_images(self.images)
                batch = Decoded(images, self.keys, self.resume_at, self.source.stats(), np.array(self.ids, dtype=np.int64),
                                extents)
                if not self.put(batch, keep_alive=True):
                    return False
                self.images, self.keys, self.ids = [], [], []
            if self.stop.value:
                return False
        return True


def _close_when_stopped(source: Any, stop: Any, parent: int) -> None:
    while not stop.value:
        if os.getppid() != parent:
            # The trainer died without closing us (kill -9, OOM): an orphan would keep its Kafka partitions
            # (heartbeats continue) and lock out the restarted trainer, so exit at once.
            os._exit(1)
        time.sleep(0.05)
    source.close()


def _forward_commits(source: Any, commits: Any, stop: Any) -> None:
    """Hands the trainer's commit requests to the source (whose `commit` is thread-safe and non-blocking).

    A source with nothing upstream to acknowledge (shards) has them read and dropped, so that the pipe
    never fills behind the trainer."""
    commit = getattr(source, "commit", None)
    while not stop.value:
        with contextlib.suppress(queue.Empty):
            position = commits.get(timeout=0.1)
            if commit is not None:
                commit(position)


def _last_commit(commits: Any) -> dict[str, Any] | None:
    """The newest commit request still queued: positions only move forward, so it covers the older ones."""
    last = None
    with contextlib.suppress(queue.Empty, OSError, EOFError):
        while True:
            last = commits.get(timeout=0.05)
    return last


def _flush_commits(source: Any, records: Any, commits: Any, forwarder: threading.Thread) -> None:
    """At shutdown: hand over the last commit request (the final checkpoint's), then let the source end.

    The source commits from the thread that iterates it, so the generator is run until it finishes:
    `close()` makes it perform what is pending, close its consumer and stop.
    """
    forwarder.join(timeout=2)  # it exits on `stop`; afterwards nothing else touches the commit queue
    last = _last_commit(commits)
    if last is not None:
        source.commit(last)
    source.close()
    deadline = time.monotonic() + 8
    for _ in records:
        if time.monotonic() > deadline:
            break


def _send(out: queue.Queue[Any], connection: Any) -> None:
    """Writes queued messages into the pipe to the trainer, until the `None` that ends them (or the trainer is gone)."""
    while (message := out.get()) is not None:
        try:
            connection.send(message)
        except OSError:  # the trainer closed its end: nobody reads any more
            return


def run_loader(job: LoaderJob, connection: Any, stop: Any, decoding: Any, commits: Any, produced: Any) -> None:
    """The loader process: source → decode → batches, until the stream ends or `stop` is set."""
    # Ctrl-C and SIGTERM reach the whole process group: the trainer decides when this process stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    out: queue.Queue[Any] = queue.Queue(maxsize=max(1, job.prefetch))
    sender = threading.Thread(target=_send, args=(out, connection), daemon=True)
    sender.start()
    batcher = _Batcher(job, out, stop, decoding, produced)
    try:
        source = batcher.source = job.make_source(on_reject=batcher.on_reject)
        source.load_state_dict(position_to_dict(job.position))
        # A follow-mode source may be blocked waiting for new shards: closing it is what ends that wait.
        threading.Thread(target=_close_when_stopped, args=(source, stop, os.getppid()), daemon=True).start()
        records = iter(source)
        # Kafka: offsets go to the broker only once the trainer says the checkpoint holding them is durable.
        forwarder = threading.Thread(target=_forward_commits, args=(source, commits, stop), daemon=True)
        forwarder.start()
        commits_upstream = hasattr(source, "commit")
        if batcher.run(records):
            batcher.put(End())
            while commits_upstream and not stop.value:  # the trainer's final checkpoint (and its commit) comes after the end
                time.sleep(0.05)
        if commits_upstream:
            _flush_commits(source, records, commits, forwarder)
    except SourceError as err:
        batcher.put(Failure(str(err)))
    except Exception as err:  # surfaces in the trainer instead of a silently dead loader
        batcher.put(Failure(f"loader process failed: {type(err).__name__}: {err}"))
    finally:
        while sender.is_alive():  # everything queued reaches the pipe before the process exits
            with contextlib.suppress(queue.Full):
                out.put(None, timeout=0.1)
                break
        sender.join()
