"""Background decoding in a separate process: records → uint8 image batches tagged with their stream position.

A worker process owns the source, decodes every image once (Pillow) and queues ready batches, so
the next batch waits while the model trains. A process, not a thread: tar parsing and decoding are
Python code holding the GIL, and a thread doing them stalls the trainer's op dispatch (measured:
the stream-fed loop ran at ~55% of in-memory speed with a loader thread on 2 cores).

Each batch carries the source's `position()` taken right after its last record: the trainer
checkpoints that position for the batch it has trained on, not for where the read-ahead is, so
prefetching never costs exactness. Rejected records travel back as `Reject` messages with a position
of their own, so that dead letters and their metric are written by the loop, as for every feed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import multiprocessing as mp
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
from PIL import Image
from torchvision.io import ImageReadMode, decode_png

from streamssl.pipeline.loading.messages import Batch, End, Failure, Message, Reject
from streamssl.pipeline.loading.positions import Position, position_to_dict
from streamssl.streams.records import Record, SourceError

IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp")


def record_id(key: str) -> int:
    """A stable non-negative 63-bit id for a record key: the same record maps to the same id in every
    process and run (Python's hash() is salted per process), as memory banks and cluster buffers need."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little") >> 1


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Past this many pixels an image is refused before decoding (Pillow's decompression-bomb limit).
_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


def _decode_png(data: bytes, channels: int) -> np.ndarray | None:
    """uint8 [H,W,C] via libpng in torchvision (≈1.8× Pillow's rate on small images, measured here); None if the
    header is not a plain PNG one, so that Pillow decides. The header's size is checked first: a bomb never
    reaches the decoder."""
    if len(data) < 24 or not data.startswith(_PNG_MAGIC) or data[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if width * height > _MAX_PIXELS:
        raise ValueError(f"corrupt_image: {width}x{height} pixels exceeds the decompression-bomb limit")
    try:
        image = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                           ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB)
    except RuntimeError as err:
        raise ValueError(f"corrupt_image: {str(err).splitlines()[0]}") from None
    return image.permute(1, 2, 0).numpy()


def decode_record(record: Record, image_field: str, channels: int, size: int) -> np.ndarray:
    """uint8 [C,size,size]; raises ValueError('missing_image' / 'corrupt_image: …')."""
    names = (image_field, *IMAGE_FIELDS, "bin")  # "bin": a Kafka value of unsniffed type (GIF, BMP, garbage)
    data = next((record.fields[name] for name in names if name in record.fields), None)
    if data is None:
        raise ValueError("missing_image")
    pixels = _decode_png(data, channels)
    if pixels is not None and pixels.shape[:2] == (size, size):
        return pixels.transpose(2, 0, 1)
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = opened.convert("L" if channels == 1 else "RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            pixels = np.asarray(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"corrupt_image: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    return pixels.reshape(size, size, channels).transpose(2, 0, 1)


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


def _payload(record: Record, image_field: str) -> bytes:
    """The bytes a dead-letter topic gets for a rejected record: its image field, else its first field."""
    for name in (image_field, *IMAGE_FIELDS, *record.fields):
        if name in record.fields:
            return record.fields[name]
    return b""


@dataclass
class _Decoded:
    """A batch as the loader process sends it: numpy, pickled by value (torch tensors would travel as shared-memory
    handles that die with this process if it exits before the trainer has read them)."""

    images: np.ndarray
    keys: list[str]
    position: Position | None
    source_stats: dict[str, float]
    ids: np.ndarray

    def batch(self) -> Batch:
        return Batch(torch.from_numpy(self.images), self.keys, self.position, self.source_stats, torch.from_numpy(self.ids))


class _Batcher:
    """The loader process's side: records decoded into batches, and rejects, queued in stream order.

    `resume_at` is the newest position with no decoded record waiting for its batch; a reject carries it (see
    `Reject`), so that a checkpoint taken right after a reject never skips the records read before it.
    """

    def __init__(self, out: Any, stop: Any, batch_size: int, image_field: str, channels: int, size: int,
                 position: Position | None) -> None:
        self.out, self.stop, self.batch_size = out, stop, batch_size
        self.image_field, self.channels, self.size = image_field, channels, size
        self.source: Any = None
        self.images: list[np.ndarray] = []
        self.keys: list[str] = []
        self.resume_at = position

    def put(self, message: Any, keep_alive: bool = False) -> bool:
        """Puts `message` unless stopped first; while the queue is full, a Kafka source keeps its group (`keep_alive`)."""
        idle = getattr(self.source, "keep_alive", None) if keep_alive else None
        while not self.stop.value:
            try:
                self.out.put(message, timeout=0.1)
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

    def run(self, records: Any) -> bool:
        """Decodes records into batches on the queue; True at the end of a finite stream, False when stopped."""
        for record in records:
            try:
                self.images.append(decode_record(record, self.image_field, self.channels, self.size))
                self.keys.append(record.key)
            except ValueError as err:
                reason, _, detail = str(err).partition(": ")
                self.reject(Reject(record.source, record.key, reason, detail, _payload(record, self.image_field)))
            if len(self.images) == self.batch_size:
                self.resume_at = self.source.position()
                ids = np.array([record_id(key) for key in self.keys], dtype=np.int64)
                if not self.put(_Decoded(np.stack(self.images), self.keys, self.resume_at, self.source.stats(), ids),
                                keep_alive=True):
                    return False
                self.images, self.keys = [], []
            if self.stop.value:
                return False
        return True


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
    deadline = time.monotonic() + 10
    for _ in records:
        if time.monotonic() > deadline:
            break


def _worker(make_source: Callable[..., Any], position: Position | None, batch_size: int, image_field: str,
            channels: int, size: int, out: Any, stop: Any, commits: Any) -> None:
    """Runs in the loader process: source → decode → batches, until the stream ends or `stop` is set."""
    # Ctrl-C reaches the whole process group: the trainer decides when this process stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = os.getppid()
    batcher = _Batcher(out, stop, batch_size, image_field, channels, size, position)
    try:
        source = batcher.source = make_source(on_reject=batcher.on_reject)
        source.load_state_dict(position_to_dict(position))
        # A follow-mode source may be blocked waiting for new shards: closing it is what ends that wait.
        threading.Thread(target=_close_when_stopped, args=(source, stop, parent), daemon=True).start()
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


class BatchLoader:
    """Hands out the messages of a source built by `make_source(on_reject=…)` in a worker process: `Batch`es,
    `Reject`s, then `End` for a finite stream, or a `Failure`.

    `next()` raises queue.Empty when nothing arrived within `timeout`.
    """

    def __init__(self, make_source: Callable[..., Any], position: Position | None, batch_size: int,
                 image_field: str, channels: int, size: int, prefetch: int = 4) -> None:
        # fork starts in milliseconds and needs nothing picklable; spawn where fork does not exist.
        context = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")
        self._queue = context.Queue(maxsize=prefetch)
        # A lock-free shared flag: a multiprocessing Event can hang set() if the process dies while waiting on it.
        self._stop = context.Value("b", 0, lock=False)
        self._commits = context.Queue()
        self._ended = False
        self._process = context.Process(
            target=_worker, name="streamssl-loader", daemon=True,
            args=(make_source, position, batch_size, image_field, channels, size, self._queue, self._stop,
                  self._commits))
        self._process.start()

    def next(self, timeout: float) -> Message:
        if self._ended:
            return End()
        try:
            message = self._queue.get(timeout=timeout)
        except queue.Empty:
            if not self._process.is_alive():
                return Failure(f"loader process exited with code {self._process.exitcode}")
            raise
        self._ended = isinstance(message, End)
        return message.batch() if isinstance(message, _Decoded) else message

    def commit(self, position: Position | None) -> None:
        """Asks the source to commit `position` upstream (Kafka offsets); call only once it is durably checkpointed."""
        self._commits.put(position_to_dict(position))

    def close(self) -> None:
        self._stop.value = 1
        # Drain while waiting: the worker cannot exit until its queued batches are flushed into the pipe.
        deadline = time.monotonic() + 10
        while self._process.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty, OSError, EOFError):
                self._queue.get(timeout=0.05)
        if self._process.is_alive():
            self._process.terminate()
        self._process.join(timeout=5)
        self._queue.close()
        # Commit requests still unsent have no reader once the worker is gone (and a source without `commit`
        # never reads them): without this, exit waits forever for their feeder thread to fill a full pipe.
        self._commits.cancel_join_thread()
        self._commits.close()
