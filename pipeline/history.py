"""The run's history: RUN_DIR/metrics.jsonl, one JSON object per progress interval, eval and publish.

Appended by rank 0 and never rewritten, so a crash loses at most the line being written; a reader skips a
torn last line. `streamssl report` draws its curves from it.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from streamssl.pipeline.run_state import RunState


class History:
    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = Path(path), enabled

    def append(self, kind: str, state: RunState, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # JSON has no NaN: a non-finite value (the loss before the first step) is written as null
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
        line = {"time": round(time.time(), 3), "kind": kind, "step": state.step, "samples_seen": state.samples_seen,
                **clean}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")


def read_history(path: Path) -> list[dict[str, Any]]:
    """Every complete line of a metrics.jsonl; [] if there is none."""
    if not Path(path).is_file():
        return []
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the torn last line of a crash
            continue
    return rows
