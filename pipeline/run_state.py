"""The loop's own counters, which every checkpoint holds next to the task's state."""

from __future__ import annotations

from dataclasses import dataclass, field

from streamssl.pipeline.loading.positions import Position


@dataclass
class RunState:
    """Counters that go into every checkpoint next to the task's own state."""

    step: int = 0
    samples_seen: int = 0
    checkpoints_written: int = 0
    position: Position | None = None  # the stream right after the last message handled; None before the first
    eval_metrics: dict[str, float] = field(default_factory=dict)
    published_step: int = -1
    # The schedule: the step the LR anneals to (0 = none) and where the current cycle began (a time-bounded
    # invocation that resumes a finished schedule starts a new cycle: a warm restart).
    horizon_steps: int = 0
    cycle_start: int = 0
    eval_step: int = -1  # the step `eval_metrics` were measured at
    first_position: Position | None = None  # the stream right after the first message trained on: the lineage's start
