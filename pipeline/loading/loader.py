"""Background decoding in a separate process: records → uint8 image batches tagged with their stream position.

A worker process owns the source, decodes every image once (Pillow) and queues ready batches, so
the next batch waits while the model trains. A process, not a thread: tar parsing and decoding are
Python code holding the GIL, and a thread doing them stalls the trainer's op dispatch (measured:
the stream-fed loop ran at ~55% of in-memory speed with a loader thread on 2 cores).

Each batch carries the source's `state_dict()` taken right after its last record: the trainer
checkpoints that position for the batch it has trained on, not for where the read-ahead is, so
prefetching never costs exactness. Rejected records travel back as messages, so dead letters and
their metric are written by the trainer's process.
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
from torch import Tensor
from torchvision.io import ImageReadMode, decode_png

from streamssl.pipeline.loading.deadletter import DeadLetters
from streamssl.streams.records import Record, SourceError

IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp")


@dataclass
class Batch:
    images: Tensor  # uint8 [B,C,H,W]
    keys: list[str]
    position: dict[str, Any]  # source state right after the batch's last record
    source_stats: dict[str, float]
    ids: Tensor  # int64 [B], record_id(key) of each record


def record_id(key: str) -> int:
    """A stable non-negative 63-bit id for a record key: the same record maps to the same id in every
    process and run (Python's hash() is salted per process), as memory banks and cluster buffers need."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


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


def _put(out: Any, stop: Any, message: tuple[Any, ...], idle: Callable[[], None] | None = None) -> bool:
    """Puts `message` unless stopped first; `idle` runs while the queue is full (a Kafka source keeps its group)."""
    while not stop.value:
        try:
            out.put(message, timeout=0.1)
            return True
        except queue.Full:
            if idle is not None:
                idle()
    return False


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


def _batches(source: Any, records: Any, batch_size: int, image_field: str, channels: int, size: int, out: Any,
             stop: Any) -> bool:
    """Decodes records into batches on the queue; True at the end of a finite stream, False when stopped."""
    images: list[np.ndarray] = []
    keys: list[str] = []
    idle = getattr(source, "keep_alive", None)
    for record in records:
        try:
            images.append(decode_record(record, image_field, channels, size))
            keys.append(record.key)
        except ValueError as err:
            reason, _, detail = str(err).partition(": ")
            _put(out, stop, ("reject", record.source, record.key, reason, detail, _payload(record, image_field)), idle)
        if len(images) == batch_size:
            # numpy, pickled by value: torch tensors would travel as shared-memory handles that die
            # with this process if it exits before the trainer has read them.
            ids = np.array([record_id(key) for key in keys], dtype=np.int64)
            if not _put(out, stop, ("batch", np.stack(images), keys, source.state_dict(), source.stats(), ids), idle):
                return False
            images, keys = [], []
        if stop.value:
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


def _worker(make_source: Callable[..., Any], position: dict[str, Any], batch_size: int, image_field: str,
            channels: int, size: int, out: Any, stop: Any, commits: Any) -> None:
    """Runs in the loader process: source → decode → batches, until the stream ends or `stop` is set."""
    # Ctrl-C reaches the whole process group: the trainer decides when this process stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = os.getppid()
    try:
        source = make_source(
            on_reject=lambda shard, key, reason: _put(out, stop, ("reject", shard, key, reason, "", b"")))
        source.load_state_dict(position)
        # A follow-mode source may be blocked waiting for new shards: closing it is what ends that wait.
        threading.Thread(target=_close_when_stopped, args=(source, stop, parent), daemon=True).start()
        records = iter(source)
        # Kafka: offsets go to the broker only once the trainer says the checkpoint holding them is durable.
        forwarder = threading.Thread(target=_forward_commits, args=(source, commits, stop), daemon=True)
        forwarder.start()
        commits_upstream = hasattr(source, "commit")
        if _batches(source, records, batch_size, image_field, channels, size, out, stop):
            _put(out, stop, ("end",))
            while commits_upstream and not stop.value:  # the trainer's final checkpoint (and its commit) comes after the end
                time.sleep(0.05)
        if commits_upstream:
            _flush_commits(source, records, commits, forwarder)
    except SourceError as err:
        _put(out, stop, ("error", str(err)))
    except Exception as err:  # surfaces in the trainer instead of a silently dead loader
        _put(out, stop, ("error", f"loader process failed: {type(err).__name__}: {err}"))


def read_message(message: tuple[Any, ...], dead_letters: DeadLetters) -> Batch | None:
    """A loader message: a batch is returned, a reject dead-lettered, an error raised; None for all but a batch."""
    kind = message[0]
    if kind == "batch":
        return Batch(torch.from_numpy(message[1]), *message[2:5], torch.from_numpy(message[5]))
    if kind == "reject":
        dead_letters.reject(*message[1:])
    elif kind != "end":
        raise SourceError(message[1])
    return None


class BatchLoader:
    """Iterates `Batch`es from a source built by `make_source(on_reject=…)` in a worker process.

    `next()` returns None at the end of a finite stream and raises queue.Empty after `timeout`.
    """

    def __init__(self, make_source: Callable[..., Any], position: dict[str, Any], batch_size: int,
                 image_field: str, channels: int, size: int, dead_letters: DeadLetters, prefetch: int = 4) -> None:
        # fork starts in milliseconds and needs nothing picklable; spawn where fork does not exist.
        context = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.dead_letters = dead_letters
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

    def next(self, timeout: float) -> Batch | None:
        while not self._ended:
            try:
                message = self._queue.get(timeout=timeout)
            except queue.Empty:
                if not self._process.is_alive():
                    raise SourceError(f"loader process exited with code {self._process.exitcode}") from None
                raise
            batch = read_message(message, self.dead_letters)
            if batch is not None:
                return batch
            self._ended = message[0] == "end"
        return None

    def commit(self, position: dict[str, Any]) -> None:
        """Asks the source to commit `position` upstream (Kafka offsets); call only once it is durably checkpointed."""
        self._commits.put(position)

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
