"""Progress and log lines for people (text, ISO time first) and for log aggregators (`--log-format json`).

Text: `2026-12-01T22:40:10+00:00 step 600 | 512 samples/s | … | eta 4m05s`; the ETA appears when the run is
bounded by `train.max_steps` or `train.max_minutes` (the nearer of the two). JSON: one object per line with
`time`, `level`, `message`, `event` (progress, done, log) and the values of the line (`step`, `samples_seen`,
`eta_seconds`, `loss`, …); a value that is not finite is written as null (JSON has no NaN). Log records go
through the same two formats (`setup_logging`), so a loader process forked after it writes them alike.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from datetime import datetime
from typing import Any, Literal, TextIO

from streamssl.pipeline.run_state import RunState
from streamssl.pipeline.sections import TrainConfig

log = logging.getLogger(__name__)

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")


def iso_time(unix: float | None = None) -> str:
    """Local time with its UTC offset, to the second: `2026-12-01T22:40:10+00:00`."""
    return datetime.fromtimestamp(time.time() if unix is None else unix).astimezone().isoformat(timespec="seconds")


def clock(seconds: float) -> str:
    """A duration as `45s`, `4m05s` or `2h03m`."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def json_line(record: dict[str, Any]) -> str:
    """One JSON object on one line; non-finite floats become null."""
    def finite(value: Any) -> Any:
        return None if isinstance(value, float) and not math.isfinite(value) else value

    return json.dumps({key: finite(value) for key, value in record.items()}, default=str)


class ProgressLine(str):
    """A task's progress line that also carries the values it shows (for the JSON format)."""

    fields: dict[str, float]

    def __new__(cls, text: str, **fields: float) -> ProgressLine:
        line = super().__new__(cls, text)
        line.fields = fields
        return line


class ProgressLog:
    """The loop's progress lines and its final `done: …` line on `out`, in the run's `train.log_format`."""

    def __init__(self, out: TextIO, train: TrainConfig) -> None:
        self.out, self.format = out, train.log_format
        self.max_steps, self.max_seconds = train.max_steps, train.max_minutes * 60
        self.started, self.start_step = time.monotonic(), 0

    def start(self, step: int) -> None:
        """This invocation trains from `step` on, from now (the ETA's step rate is measured from here)."""
        self.started, self.start_step = time.monotonic(), step
        if not (self.max_steps or self.max_seconds):
            log.info("no step or time budget: training until stopped (a stop finishes the step, checkpoints, publishes)")

    def eta_seconds(self, step: int) -> float | None:
        """Seconds until the nearer bound (max_steps at this invocation's step rate, or the time budget); None
        when the run is unbounded, or bounded by steps alone and no step has been timed yet."""
        elapsed = time.monotonic() - self.started
        left: list[float] = []
        if self.max_seconds:
            left.append(max(self.max_seconds - elapsed, 0.0))
        if self.max_steps and step > self.start_step and elapsed > 0:
            left.append(max(self.max_steps - step, 0) * elapsed / (step - self.start_step))
        return min(left) if left else None

    def progress(self, line: str, state: RunState, fields: dict[str, float]) -> None:
        eta = self.eta_seconds(state.step)
        if self.format == "json":
            values = {**state.eval_metrics, **fields, **getattr(line, "fields", {})}
            self._write(json_line({"time": iso_time(), "level": "info", "message": str(line), "event": "progress",
                                   "step": state.step, "samples_seen": state.samples_seen, "eta_seconds": eta,
                                   **values}))
        else:
            self._write(f"{iso_time()} {line}" + ("" if eta is None else f" | eta {clock(eta)}"))

    def done(self, line: str, state: RunState) -> None:
        if self.format == "json":
            self._write(json_line({"time": iso_time(), "level": "info", "message": line, "event": "done",
                                   "step": state.step, "samples_seen": state.samples_seen}))
        else:
            self._write(f"{iso_time()} {line}")

    def _write(self, text: str) -> None:
        print(text, file=self.out, flush=True)


class JsonFormatter(logging.Formatter):
    """A log record as one JSON object: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"time": iso_time(record.created), "level": record.levelname.lower(),
                                 "message": record.getMessage(), "event": "log", "logger": record.name}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json_line(entry)


class TextFormatter(logging.Formatter):
    """`2026-12-01T22:40:10+00:00 INFO streamssl.pipeline.loop: message`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return iso_time(record.created)


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at each record, not the one at set-up (the CLI run in-process, as tests
    and notebooks do, would otherwise keep writing to a stream that was replaced and closed)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _: TextIO) -> None:
        pass


def setup_logging(log_format: LogFormat = "text", stream: TextIO | None = None) -> None:
    """INFO and up from every logger to `stream` (the current stderr), in `log_format`; calling it again replaces
    the handler."""
    handler = logging.StreamHandler(stream) if stream is not None else _CurrentStderr()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
