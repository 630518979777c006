"""Ray Data feeding one trainer: rows decoded in Ray Data tasks, handed over as `Batch`es with an exact position.

`ray_dataset` reads a `ray+…` spec and attaches the decode step; `RayDataFeed` is the loader a trainer uses
for its share (a `streaming_split` iterator, or the whole dataset with one worker).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from functools import partial
from typing import Any

import numpy as np
import torch

from streamssl.pipeline.config import Config, replayed_per_step
from streamssl.pipeline.loading.decode import decode_or_reason, decoded_side, payload, record_id
from streamssl.pipeline.loading.loader_worker import stack_images
from streamssl.pipeline.loading.messages import Batch, End, Failure, Message, Reject
from streamssl.pipeline.loading.positions import Position, position_to_dict
from streamssl.pipeline.loading.sources import resolve_mode, source_spec
from streamssl.streams.ray_source import RayShardReader, read_ray_dataset, unlisted_shards
from streamssl.streams.records import Record, SourceError

log = logging.getLogger(__name__)


# --- Ray Data: decoding, and the batches one worker gets ------------------------------------------------
def decode_rows(rows: dict[str, np.ndarray], *, image_field: str, channels: int, size: int, max_record_bytes: int = 0,
                full_side: int = 0) -> dict[str, np.ndarray]:
    """Runs inside Ray Data tasks: {key, image, source} rows → `streams.ray_source.DECODED_COLUMNS`.

    Every row's encoded image is decoded, or refused with its reason, by the loader process's own function
    (`decode_or_reason`), with the same sides (`full_side`, see `decoded_side`) and limit (`max_record_bytes`).
    """
    keys, sources, encoded = rows["key"], rows["source"], rows["image"]
    count = len(keys)
    reasons, details, payloads = [""] * count, [""] * count, [b""] * count
    images: list[np.ndarray] = []
    for row in range(count):
        record = Record(str(keys[row]), {image_field: encoded[row]} if len(encoded[row]) else {}, str(sources[row]), row)
        image, reasons[row], details[row] = decode_or_reason(record, image_field, channels, size, max_record_bytes,
                                                             full_side)
        if image is None:
            image, payloads[row] = np.zeros((channels, size, size), dtype=np.uint8), payload(record, image_field)
        images.append(image)
    column = _image_column(images) if images else np.zeros((0, channels, size, size), dtype=np.uint8)
    return {"image": column, "key": keys,
            "id": np.array([record_id(str(key)) for key in keys], dtype=np.int64),
            "reason": np.array(reasons, dtype=object), "detail": np.array(details, dtype=object),
            "payload": np.array(payloads, dtype=object), "source": sources}


def _image_column(images: list[np.ndarray]) -> np.ndarray:
    """One uint8 [N, C, H, W] array for images of one shape, else an object array of them (Ray Data keeps those as a
    variable-shaped tensor column)."""
    if len({image.shape for image in images}) == 1:
        return np.stack(images)
    column = np.empty(len(images), dtype=object)
    for row, image in enumerate(images):  # one by one: a list assigned at once would be broadcast into 4 dimensions
        column[row] = image
    return column


def ray_dataset(cfg: Config) -> Any:
    """The training dataset of a `ray+…` data spec, decoded for this config (lazy; Ray must be running)."""
    decode = partial(decode_rows, image_field=cfg.data.image_field, channels=cfg.data.channels, size=cfg.data.size,
                     max_record_bytes=cfg.data.max_record_bytes, full_side=decoded_side(cfg))
    return read_ray_dataset(cfg.data.source, decode, image_field=cfg.data.image_field)


class RayDataFeed:
    """The trainer's loader for a Ray dataset: a `RayShardReader` run on a thread, its messages queued ahead.

    A thread, not the loader's process: the reading and decoding already happen in Ray Data tasks, and a
    Ray iterator cannot cross a fork. `waiting_for_pass` and `drain()` let workers of a `streaming_split`
    get past its per-pass barrier (see `WorkerTrainer.next_batch`).

    With `report_unlisted` (rank 0), shards Ray Data cannot list (`unlisted_shards`) are dead-lettered first when
    the feed starts at the beginning of a pass; a resume in the middle of one does not report them again.
    """

    def __init__(self, iterator: Any, position: Position | None, cfg: Config, report_unlisted: bool = False) -> None:
        mode = resolve_mode(source_spec(cfg.data), cfg.data.mode)
        # As the loader process's: batches of the arriving records, the replay buffer's come on top in the step.
        self._reader = RayShardReader(iterator, batch_size=cfg.train.batch_size - replayed_per_step(cfg), mode=mode,
                                      shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.train.seed,
                                      on_reject=self._on_reject)
        self._reader.load_state_dict(position_to_dict(position))
        self._iterator = iterator
        self._prefetch = cfg.data.prefetch_batches
        self._messages: deque[Message] = deque()
        self._batches_queued = 0
        self._ready = threading.Condition()
        self._drain_pass = -1  # while the reader reads this pass, the prefetch bound is lifted
        self._closed = False
        self._ended = False
        if report_unlisted and self._reader.position().rows == 0:
            for shard, reason, detail in unlisted_shards(cfg.data.source):
                self._put(Reject(shard, "", reason, detail, b"", self._reader.position()), bounded=False)
        self._thread = threading.Thread(target=self._feed, name="streamssl-ray-feed", daemon=True)
        self._thread.start()

    @property
    def waiting_for_pass(self) -> bool:
        return self._reader.waiting_for_pass

    @property
    def queued_batches(self) -> int:
        """Batches read ahead and not handed out yet."""
        return self._batches_queued

    def drain(self) -> None:
        """Read to the end of the current pass regardless of the prefetch bound (another worker waits there)."""
        with self._ready:
            self._drain_pass = self._reader.reading_pass
            self._ready.notify_all()

    def _on_reject(self, source: str, key: str, reason: str, detail: str = "", payload: bytes = b"") -> None:
        # The reader's position is past the row only while no good row before it waits for a batch.
        self._put(Reject(source, key, reason, detail, payload, self._reader.position()), bounded=False)

    def _put(self, message: Message, bounded: bool = True) -> None:
        with self._ready:
            while (bounded and self._batches_queued >= self._prefetch and not self._closed
                   and self._drain_pass != self._reader.reading_pass):
                self._ready.wait(0.1)
            self._messages.append(message)
            self._batches_queued += isinstance(message, Batch)
            self._ready.notify_all()

    def _feed(self) -> None:
        try:
            for images, keys, ids, position in self._reader:
                canvas, extents = stack_images(images)  # padded with extents as the loader process's batches are
                self._put(Batch(torch.from_numpy(canvas), keys, position, self._reader.stats(), torch.from_numpy(ids),
                                None if extents is None else torch.from_numpy(extents)))
            self._put(End(), bounded=False)
        except SourceError as err:
            self._put(Failure(str(err)), bounded=False)
        except SystemExit:
            return  # Ray shut down while this thread waited for data (the run is over)
        except Exception as err:  # a failed Ray Data task surfaces here: end the run with it, not a silent hang
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
            self._put(Failure(f"Ray Data read failed: {type(err).__name__}: {first_line}"), bounded=False)

    def next(self, timeout: float) -> Message:
        """The next message; raises queue.Empty when none arrived within `timeout`."""
        if self._ended:
            return End()
        deadline = time.monotonic() + timeout
        with self._ready:
            while not self._messages:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise queue.Empty
                self._ready.wait(left)
            message = self._messages.popleft()
            self._batches_queued -= isinstance(message, Batch)
            self._ready.notify_all()
        self._ended = isinstance(message, End)
        return message

    def commit(self, position: Position | None) -> None:
        """Nothing upstream to acknowledge: a Ray dataset is re-read from our own position."""

    def close(self) -> None:
        self._reader.close()
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        self._thread.join(timeout=5)
        if self._thread.is_alive():
            self._release_split()
            self._thread.join(timeout=5)

    def _release_split(self) -> None:
        """Ends a read left waiting at a `streaming_split` pass barrier that the other splits will not reach.

        Such a read stays blocked inside Ray for good, and a later `ray.shutdown()` with a thread inside Ray
        ends the whole process with exit code 1. Killing the split's coordinator actor makes the wait fail
        instead; it is only done here, when the run is over for every split.
        """
        coordinator = getattr(self._iterator, "_coord_actor", None)  # Ray Data has no public handle for it
        if coordinator is None:
            log.warning("the Ray Data reader did not stop within 5 s of close()")
            return
        import ray

        with contextlib.suppress(Exception):
            ray.kill(coordinator)
