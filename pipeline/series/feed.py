"""The series feed: a source read on a thread of its own, handed out point by point with its position.

`PointReader` iterates a series source (a ParquetSeriesSource, or a KafkaSource whose records become points
through `parse_point`) so that its consumer is never stuck behind a waiting source. `SeriesFeed` is what the
loop reads: the reader's messages (`PointMessage`, `Reject`, `End`, `Failure`), taken up to `LOOKAHEAD` at a
time so that the task can decompose the windows of the coming points in one batched call.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

from streamssl.pipeline.config import ConfigError
from streamssl.pipeline.extras import require
from streamssl.pipeline.loading.messages import End, Failure, Message, PointMessage, Reject
from streamssl.pipeline.loading.positions import Position, position_to_dict
from streamssl.pipeline.loading.sources import source_factory, source_spec
from streamssl.streams.records import Record, SourceError
from streamssl.streams.series_points import parse_point

LOOKAHEAD = 256  # messages taken at once, so that their windows are decomposed in one batched call


def series_source_factory(cfg: Any) -> Callable[..., Any]:
    """`make_source(on_reject=…)` for `data.source`; builds one first so that a bad path fails before any write."""
    data, series, spec = cfg.data, cfg.series, source_spec(cfg.data)
    if spec.kind == "kafka":
        return source_factory(data, cfg.train.seed, cfg.kafka)
    if data.mode == "cycle":
        raise ConfigError("data.mode cycle would replay old timestamps into a series; use once or follow")
    require("pyarrow", "series", "a series run")
    from streamssl.streams.series_source import ParquetSeriesSource, demo_series
    path = str(demo_series()) if spec.kind == "embedded" else spec.text  # a ray+ spec fails as a missing path
    mode = data.mode if data.mode != "auto" else "follow" if spec.is_local_directory else "once"
    make = partial(ParquetSeriesSource, path, mode=mode, poll_seconds=data.poll_seconds, time_column=series.time_column,
                   value_column=series.value_column, series_column=series.series_column)
    make().close()
    return make


class PointReader:
    """Reads a series source on a thread; `messages` receives, in stream order, a `PointMessage` or a `Reject`
    per item, then `End()` when a finite source is done or `Failure(one line)` when it fails.

    Each position is the source's `position()` right after that item, so a consumer that checkpoints the
    position of the last message it handled resumes exactly there, however far the thread has read ahead.
    Garbage becomes a reject carrying its bytes: a record `parse_point` refuses with its reason, one it fails on in
    any other way as "unreadable_record".

    Args:
        make_source: `make_source(on_reject=…)` builds the source.
        position: where to start (None = the beginning).
    """

    def __init__(self, make_source: Callable[..., Any], position: Position | None) -> None:
        self.messages: queue.Queue[Message] = queue.Queue(maxsize=4096)
        self.stats: dict[str, float] = {}
        self._stopping = threading.Event()
        self.source = make_source(on_reject=self._on_reject)
        self.source.load_state_dict(position_to_dict(position))
        self._thread = threading.Thread(target=self._run, name="streamssl-series-reader", daemon=True)
        self._thread.start()

    def _on_reject(self, source: str, key: str, reason: str, detail: str = "", payload: bytes = b"") -> None:
        self._put(Reject(source, key, reason, detail, payload, self.source.position()))

    def _put(self, message: Message) -> None:
        while not self._stopping.is_set():
            try:
                self.messages.put(message, timeout=0.1)
                return
            except queue.Full:
                continue

    def _reject_record(self, record: Record, reason: str, detail: str = "") -> None:
        self._on_reject(record.source, record.key, reason, detail[:500],
                        record.fields.get("json", record.fields.get("bin", b"")))

    def _run(self) -> None:
        try:
            for count, item in enumerate(self.source):
                if self._stopping.is_set():
                    continue  # closed: let the source finish its own way (a Kafka source commits, then leaves)
                if isinstance(item, Record):
                    try:
                        item = parse_point(item)
                    except ValueError as err:
                        self._reject_record(item, *str(err).split(": ", 1))
                        continue
                    except Exception as err:  # one bad record is that record's reject, never the job's end
                        self._reject_record(item, "unreadable_record", f"{type(err).__name__}: {err}")
                        continue
                self._put(PointMessage(item, self.source.position()))
                if count % 256 == 0:
                    self.stats = self.source.stats()
            self._put(End())
        except SourceError as err:
            self._put(Failure(str(err)))
        except Exception as err:  # surfaces in the job instead of a silently dead reader
            self._put(Failure(f"series reader failed: {type(err).__name__}: {err}"))

    def commit(self, position: Position | None) -> None:
        """Upstream commit (Kafka offsets) of a durably checkpointed position; a no-op for files."""
        if hasattr(self.source, "commit"):
            self.source.commit(position_to_dict(position))

    def close(self) -> None:
        self._stopping.set()
        self.source.close()
        self._thread.join(timeout=10)


class SeriesFeed:
    """The loop's view of a `PointReader`.

    `inbox` holds messages taken from the reader but not handed out yet (not part of any position);
    `ahead(inbox)` runs each time it is refilled.
    """

    def __init__(self, reader: PointReader, ahead: Callable[[deque[Message]], None]) -> None:
        self.reader, self.ahead = reader, ahead
        self.inbox: deque[Message] = deque()

    def next(self, timeout: float) -> Message:
        """The next message; raises queue.Empty when none arrived within `timeout`. `End` stays: the reader is done."""
        if not self.inbox:
            self.inbox.append(self.reader.messages.get(timeout=timeout))  # queue.Empty: nothing yet
            while len(self.inbox) < LOOKAHEAD and not self.reader.messages.empty():
                self.inbox.append(self.reader.messages.get_nowait())
            self.ahead(self.inbox)
        return self.inbox[0] if isinstance(self.inbox[0], End) else self.inbox.popleft()

    @property
    def stats(self) -> dict[str, float]:
        return self.reader.stats

    def commit(self, position: Position | None) -> None:
        self.reader.commit(position)

    def close(self) -> None:
        self.reader.close()
