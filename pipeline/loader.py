"""Background decoding: records → uint8 image batches, each tagged with the stream position after it.

One thread reads the source, decodes every image once (Pillow, whose decoders release the GIL),
and queues ready batches so the next batch is waiting while the model trains. Each batch
carries the source's `state_dict()` taken right after its last record: the trainer checkpoints that
position for the batch it has trained on, not for where the read-ahead happens to be, so the
prefetch never costs exactness.
"""

from __future__ import annotations

import io
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from streamssl.pipeline.deadletter import DeadLetters
from streamssl.streams.records import Record

IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp")
_END = object()


@dataclass
class Batch:
    images: Tensor  # uint8 [B,C,H,W]
    keys: list[str]
    position: dict[str, Any]  # source state right after the batch's last record
    source_stats: dict[str, float]


def decode_record(record: Record, image_field: str, channels: int, size: int) -> Tensor:
    """uint8 [C,size,size]; raises ValueError('missing_image' / 'corrupt_image: …')."""
    names = (image_field, *IMAGE_FIELDS)
    data = next((record.fields[name] for name in names if name in record.fields), None)
    if data is None:
        raise ValueError("missing_image")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            pixels = np.asarray(opened.convert("L" if channels == 1 else "RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"corrupt_image: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    image = torch.from_numpy(pixels.copy()).reshape(pixels.shape[0], pixels.shape[1], channels).permute(2, 0, 1)
    if image.shape[1:] != (size, size):
        image = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", antialias=True)
        image = image[0].round().clamp(0, 255).to(torch.uint8)
    return image


class BatchLoader:
    """Iterates `Batch`es from a source in a daemon thread; `next()` returns None at end of stream."""

    def __init__(self, source: Any, batch_size: int, image_field: str, channels: int, size: int,
                 dead_letters: DeadLetters, prefetch: int = 4) -> None:
        self.source = source
        self.batch_size = batch_size
        self.image_field = image_field
        self.channels = channels
        self.size = size
        self.dead_letters = dead_letters
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="streamssl-loader", daemon=True)
        self._thread.start()

    def _batches(self) -> Iterator[Batch]:
        images: list[Tensor] = []
        keys: list[str] = []
        for record in self.source:
            try:
                images.append(decode_record(record, self.image_field, self.channels, self.size))
                keys.append(record.key)
            except ValueError as err:
                reason, _, detail = str(err).partition(": ")
                self.dead_letters.reject(record.source, record.key, reason, detail)
            if len(images) == self.batch_size:
                yield Batch(torch.stack(images), keys, self.source.state_dict(), self.source.stats())
                images, keys = [], []
            if self._stop.is_set():
                return

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for batch in self._batches():
                if not self._put(batch):
                    return
            self._put(_END)
        except BaseException as err:  # surfaces in the trainer's thread instead of dying silently
            self._put(err)

    def next(self, timeout: float) -> Batch | None:
        """The next batch; None at end of stream. Raises queue.Empty after `timeout` seconds."""
        item = self._queue.get(timeout=timeout)
        if item is _END:
            self._queue.put(_END)  # stay at the end for later calls
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self.source.close()
        self._thread.join(timeout=10)
