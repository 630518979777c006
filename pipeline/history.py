"""The run's history: RUN_DIR/metrics.jsonl, one JSON object per progress interval, eval and publish.

Appended by rank 0 and never rewritten, so a crash loses at most the line being written; a reader skips a
torn last line. A file past `max_bytes` is renamed to metrics.jsonl.1 (the one before it is dropped), so a
week-long run keeps between one and two files' worth of its latest history. `streamssl report` draws its curves
from it.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from streamssl.pipeline.run_state import RunState
from streamssl.pipeline.sections import LogConfig
from streamssl.pipeline.tensorboard_log import TensorBoardLog, event_dir

# Progress lines measured 290-430 bytes (moco, swav, deepcluster): every 10 s, 2.5-3.7 MB a day, so one part
# holds 9-13 days and at least that much history is kept.
MAX_BYTES = 32 * 2**20


def rotated(path: Path) -> Path:
    """Where the history's previous part goes when it rotates."""
    return path.with_name(path.name + ".1")


class History:
    """Appends the run's records to `path` (the run dir's metrics.jsonl) and, with `log.tensorboard` on, to
    TensorBoard event files (pipeline/tensorboard_log.py); disabled (ranks other than 0), it writes nothing."""

    def __init__(self, path: Path, enabled: bool = True, max_bytes: int = MAX_BYTES,
                 log_cfg: LogConfig | None = None) -> None:
        self.path, self.enabled, self.max_bytes = Path(path), enabled, max_bytes
        self._checked_tail = False
        self.tensorboard: TensorBoardLog | None = None
        if enabled and log_cfg is not None and log_cfg.tensorboard:
            self.tensorboard = TensorBoardLog(event_dir(log_cfg, self.path.parent))

    def restart(self, step: int) -> None:
        """The run goes on from the checkpoint of `step` (a resume, a rollback); what was logged past it is stale."""
        if self.tensorboard is not None:
            self.tensorboard.restart(step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()

    def append(self, kind: str, state: RunState, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # JSON has no NaN: a non-finite value (the loss before the first step) is written as null
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
        line = {"time": round(time.time(), 3), "kind": kind, "step": state.step, "samples_seen": state.samples_seen,
                **clean}
        text = json.dumps(line) + "\n"
        if not self._checked_tail:  # a crash's torn last line must not swallow the first line of this run
            text = self._separator() + text
            self._checked_tail = True
        if self.path.is_file() and self.path.stat().st_size + len(text) > self.max_bytes:
            os.replace(self.path, rotated(self.path))
            text = text.lstrip("\n")
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(text)
        if self.tensorboard is not None:
            self.tensorboard.write(kind, state.step, values)

    def _separator(self) -> str:
        """"\\n" when the file ends in a torn line (no newline), else ""."""
        try:
            with open(self.path, "rb") as handle:
                handle.seek(-1, os.SEEK_END)
                return "" if handle.read(1) == b"\n" else "\n"
        except OSError:  # no file yet, or an empty one
            return ""


def read_history(path: Path) -> list[dict[str, Any]]:
    """Every complete line of a metrics.jsonl and of its rotated part before it, oldest first; [] if neither exists."""
    rows: list[dict[str, Any]] = []
    for part in (rotated(Path(path)), Path(path)):
        if not part.is_file():
            continue
        for line in part.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the torn last line of a crash
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def surviving(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the lineage the run kept: a resume from an older checkpoint (a crash, a rollback) retrains from
    there, so the rows it supersedes (samples_seen at or past the one it restarted from) are dropped."""
    kept: list[dict[str, Any]] = []
    for row in rows:
        seen = row.get("samples_seen", 0)
        if kept and kept[-1].get("samples_seen", 0) > seen:
            while kept and kept[-1].get("samples_seen", 0) >= seen:
                kept.pop()
        kept.append(row)
    return kept
