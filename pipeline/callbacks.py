"""What a Python caller hears from a run (`streamssl.pipeline.api.run`): a step, an eval, a checkpoint, a publish.

The loop (pipeline/loop.py) and eval/publishing (pipeline/release.py) call these on rank 0's thread, right after
the event. A callback that raises is the caller's bug, not the run's: it is logged (with its traceback the
first time) and the run goes on. To stop a run from a callback, set the `stop` event the run was given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Callbacks:
    """The functions to call; None = not interested.

    Attributes:
        on_step: `(step, loss, logs)` after every optimizer step that counted (a finite loss).
        on_eval: `(step, metrics)` after every eval that measured something (kNN monitor, rolling nRMSE).
        on_checkpoint: `(step, path)` once the checkpoint at `path` is durable.
        on_publish: `(step, version, folder)` once a version is published (`folder` is its version folder).
    """

    on_step: Callable[[int, float, dict[str, float]], Any] | None = None
    on_eval: Callable[[int, dict[str, float]], Any] | None = None
    on_checkpoint: Callable[[int, Path], Any] | None = None
    on_publish: Callable[[int, int, Path], Any] | None = None
    _failed: set[str] = field(default_factory=set, repr=False)

    def step(self, step: int, loss: float, logs: dict[str, float]) -> None:
        self._call("on_step", step, loss, dict(logs))

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        self._call("on_eval", step, dict(metrics))

    def checkpoint(self, step: int, path: Path) -> None:
        self._call("on_checkpoint", step, path)

    def publish(self, step: int, version: int, folder: Path) -> None:
        self._call("on_publish", step, version, folder)

    def _call(self, name: str, *args: Any) -> None:
        function = getattr(self, name)
        if function is None:
            return
        try:
            function(*args)
        except Exception as err:
            first = name not in self._failed
            self._failed.add(name)
            log.warning("callback %s raised %s: %s; the run goes on", name, type(err).__name__, err, exc_info=first)
