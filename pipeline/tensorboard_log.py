"""TensorBoard event files of a run (`log.tensorboard`): the history's records (pipeline/history.py) as scalars.

Every number of a progress, eval or publish record becomes the scalar `KIND/NAME` at the record's optimizer step
(`progress/loss`, `progress/lr`, `eval/knn_top1`, `eval/drift_auc`, `eval/rolling_nrmse`, `publish/version`, …),
so `tensorboard --logdir RUN_DIR/tensorboard` draws what metrics.jsonl holds. The history writes on rank 0 only,
so only rank 0 writes here. The event file opens at the first record (the run dir is locked by then) and is
flushed at each eval and closed when the run ends, however it ends.

A resumed run, or one rolled back, adds a new event file to the same folder that starts with a purge step: the
session start that tells TensorBoard to hide what the earlier files logged past the checkpoint it continues from
(those steps are trained again), so the curves go on from the checkpoint's step. (TensorBoard's Rust loader,
`--load_fast`, ignores it and drops a point only when its tag logs that step again, as the progress tags do.)
Failing to write event files (a full disk) is logged once and never stops the run.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from streamssl.pipeline.config import Config, ConfigError, Job
from streamssl.pipeline.extras import require
from streamssl.pipeline.sections import LogConfig

log = logging.getLogger(__name__)

WHAT = "log.tensorboard"  # the feature, as the user turns it on


def _summary_writer() -> Any:
    """torch's SummaryWriter class; ConfigError naming the extra when the tensorboard package is missing."""
    require("tensorboard", "tensorboard", WHAT)  # first: torch.utils.tensorboard would name it as a missing part
    return require("torch.utils.tensorboard", "tensorboard", WHAT).SummaryWriter


def event_dir(log_cfg: LogConfig, run_dir: Path) -> Path:
    """Where the event files go: `log.tensorboard_dir`, relative to the run dir (default RUN_DIR/tensorboard)."""
    return Path(run_dir) / (log_cfg.tensorboard_dir or "tensorboard")


def check_tensorboard(cfg: Config, job: Job) -> None:
    """Refuses, at config time, `log.tensorboard` without its package, and settings that would write nowhere."""
    log_cfg = cfg.log
    if not log_cfg.tensorboard:
        if log_cfg.tensorboard_dir:
            raise ConfigError("log.tensorboard_dir is set but log.tensorboard is false: nothing would be written there")
        return
    _summary_writer()
    if job == "forecast" and not cfg.run_dir and not os.path.isabs(log_cfg.tensorboard_dir):
        raise ConfigError("log.tensorboard: `streamssl forecast` without --run-dir keeps nothing; give --run-dir or "
                          "an absolute log.tensorboard_dir")


class TensorBoardLog:
    """Writes records as scalars into event files under `directory`.

    Args:
        directory: The event files' folder (created at the first record).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._summary_writer = _summary_writer()
        self._writer: Any = None
        self._continues_from = 0  # the step this invocation trains on from (a resumed or rolled-back checkpoint's)
        self._failed = False

    def restart(self, step: int) -> None:
        """The run goes on from `step`: the next event file hides what was logged past it."""
        self.close()
        self._continues_from = step

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """The record's finite numbers as `kind/name` at `step`; flushed after an eval."""
        scalars = {name: float(value) for name, value in values.items()
                   if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)}
        if not scalars or self._failed:
            return
        try:
            if self._writer is None:
                self._writer = self._summary_writer(str(self.directory), purge_step=self._continues_from + 1)
            for name, value in scalars.items():
                self._writer.add_scalar(f"{kind}/{name}", value, step)
            if kind == "eval":
                self._writer.flush()
        except OSError as err:
            self._give_up(err)

    def close(self) -> None:
        """Flushes and closes the event file (the next record opens a new one)."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            writer.close()
        except OSError as err:
            self._give_up(err)

    def _give_up(self, err: OSError) -> None:
        self._failed, self._writer = True, None
        log.warning("cannot write TensorBoard event files to %s (%s: %s); the run goes on without them",
                    self.directory, type(err).__name__, err.strerror or err)
