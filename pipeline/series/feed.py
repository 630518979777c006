"""The series feed: a source read on a thread of its own, handed out point by point with its position.

`PointReader` iterates a series source (a ParquetSeriesSource, or a KafkaSource whose records become points
through `parse_point`) so that its consumer is never stuck behind a waiting source. `SeriesFeed` is what the
loop reads: the reader's messages, taken up to `LOOKAHEAD` at a time so that the task can decompose the
windows of the coming points in one batched call.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from streamssl.pipeline.config import ConfigError
from streamssl.pipeline.loading.messages import End, Failure, Reject
from streamssl.pipeline.loading.sources import source_factory, source_spec
from streamssl.streams.records import Record, SourceError
from streamssl.streams.series_source import ParquetSeriesSource, Point, demo_series, parse_point

LOOKAHEAD = 256  # messages taken at once, so that their windows are decomposed in one batched call


def series_source_factory(cfg: Any) -> Callable[..., Any]:
    """`make_source(on_reject=…)` for `data.source`; builds one first so that a bad path fails before any write."""
    data, series, spec = cfg.data, cfg.series, source_spec(cfg.data)
    if spec.kind == "kafka":
        return source_factory(data, cfg.train.seed, cfg.kafka)
    if data.mode == "cycle":
        raise ConfigError("data.mode cycle would replay old timestamps into a series; use once or follow")
    path = str(demo_series()) if spec.kind == "embedded" else spec.text  # a ray+ spec fails as a missing path
    mode = data.mode if data.mode != "auto" else "follow" if spec.is_local_directory else "once"
    make = partial(ParquetSeriesSource, path, mode=mode, poll_seconds=data.poll_seconds, time_column=series.time_column,
                   value_column=series.value_column, series_column=series.series_column)
    make().close()
    return make


@dataclass
class PointMessage:
    point: Point
    position: dict[str, Any] = field(default_factory=dict)  # the source right after this point


class PointReader:
    """Reads a series source on a thread; `messages` receives, in stream order, a `PointMessage` or a `Reject`
    per item, then `End()` when a finite source is done or `Failure(one line)` when it fails.

    Each position is the source's `state_dict()` right after that item, so a consumer that checkpoints the
    position of the last message it handled resumes exactly there, however far the thread has read ahead.
    Garbage becomes a reject carrying its bytes.

    Args:
        make_source: `make_source(on_reject=…)` builds the source.
        position: where to start (a `state_dict()`; empty = the beginning).
    """

    def __init__(self, make_source: Callable[..., Any], position: dict[str, Any]) -> None:
        self.messages: queue.Queue[Any] = queue.Queue(maxsize=4096)
        self.stats: dict[str, float] = {}
        self._stopping = threading.Event()
        self.source = make_source(on_reject=self._on_reject)
        self.source.load_state_dict(position)
        self._thread = threading.Thread(target=self._run, name="streamssl-series-reader", daemon=True)
        self._thread.start()

    def _on_reject(self, source: str, key: str, reason: str, detail: str = "", payload: bytes = b"") -> None:
        self._put(Reject(source, key, reason, detail, payload, self.source.state_dict()))

    def _put(self, message: Any) -> None:
        while not self._stopping.is_set():
            try:
                self.messages.put(message, timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        try:
            for count, item in enumerate(self.source):
                if self._stopping.is_set():
                    continue  # closed: let the source finish its own way (a Kafka source commits, then leaves)
                if isinstance(item, Record):
                    try:
                        item = parse_point(item)
                    except ValueError as err:
                        reason, _, detail = str(err).partition(": ")
                        self._on_reject(item.source, item.key, reason, detail,
                                        item.fields.get("json", item.fields.get("bin", b"")))
                        continue
                self._put(PointMessage(item, self.source.state_dict()))
                if count % 256 == 0:
                    self.stats = self.source.stats()
            self._put(End())
        except SourceError as err:
            self._put(Failure(str(err)))
        except Exception as err:  # surfaces in the job instead of a silently dead reader
            self._put(Failure(f"series reader failed: {type(err).__name__}: {err}"))

    def commit(self, position: dict[str, Any]) -> None:
        """Upstream commit (Kafka offsets) of a durably checkpointed position; a no-op for files."""
        if hasattr(self.source, "commit"):
            self.source.commit(position)

    def close(self) -> None:
        self._stopping.set()
        self.source.close()
        self._thread.join(timeout=10)


class SeriesFeed:
    """The loop's view of a `PointReader`: None at the end, `SourceError` on a failure.

    `inbox` holds messages taken from the reader but not handed out yet (not part of any position);
    `ahead(inbox)` runs each time it is refilled.
    """

    def __init__(self, reader: PointReader, ahead: Callable[[deque[Any]], None]) -> None:
        self.reader, self.ahead = reader, ahead
        self.inbox: deque[Any] = deque()

    def next(self, timeout: float) -> Any:
        if not self.inbox:
            self.inbox.append(self.reader.messages.get(timeout=timeout))  # queue.Empty: nothing yet
            while len(self.inbox) < LOOKAHEAD and not self.reader.messages.empty():
                self.inbox.append(self.reader.messages.get_nowait())
            self.ahead(self.inbox)
        message = self.inbox.popleft()
        if isinstance(message, End):
            return None
        if isinstance(message, Failure):
            raise SourceError(message.message)
        return message

    @property
    def stats(self) -> dict[str, float]:
        return self.reader.stats

    def commit(self, position: dict[str, Any]) -> None:
        self.reader.commit(position)

    def close(self) -> None:
        self.reader.close()
