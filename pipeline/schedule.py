"""Learning-rate schedule and the run's horizon: the step a run anneals to.

The LR is a pure function of (step, horizon): linear warm-up over a share of the horizon, then cosine
(or constant) down to the horizon. The horizon is `train.max_steps` (or `optim.total_steps`) when the run
is bounded in steps, so such a run resumes bit-exactly. A run bounded only by `--max-minutes` has no step
count up front: `HorizonEstimate` measures the step rate during the first share of the budget and then
freezes `step + remaining time × rate` as the horizon, which goes into the checkpoint, so a crashed and
resumed run continues its schedule where it stopped. A run with neither bound (an unbounded stream) has
horizon 0: warm-up, then a constant LR (see the README on week-long runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def learning_rate(step: int, base_lr: float, warmup_steps: int, schedule: str, total_steps: int,
                  min_lr_ratio: float = 0.0) -> float:
    """LR for optimizer step `step` (0-based). Cosine decays to base_lr·min_lr_ratio at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return base_lr
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    floor = base_lr * min_lr_ratio
    return floor + (base_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_length(horizon_steps: int, warmup_fraction: float, warmup_steps: int, unbounded_default: int = 100) -> int:
    """Warm-up steps: explicit `warmup_steps` if set, else a share of the horizon (a fixed default when unbounded)."""
    if warmup_steps > 0:
        return warmup_steps
    if horizon_steps > 0:
        return max(1, round(warmup_fraction * horizon_steps))
    return unbounded_default


@dataclass
class HorizonEstimate:
    """Step horizon of a time-bounded run, estimated from its measured step rate and then frozen.

    Until `measure_share` of the budget has passed (and at least `min_steps` steps were timed) the estimate
    follows the running rate; after that it stays fixed, so the rest of the run has one schedule. The first
    `skip_steps` steps (start-up, first-touch allocations) are not timed.
    """

    start_step: int
    budget_seconds: float
    measure_share: float = 0.05
    min_steps: int = 10
    skip_steps: int = 3
    horizon: int = 0
    frozen: bool = False
    _timed_from: float | None = None
    _timed_steps: int = 0

    def update(self, step: int, elapsed: float) -> int:
        """Call after each step with the run's step count and the seconds since this invocation started."""
        if self.frozen:
            return self.horizon
        done = step - self.start_step
        if done == self.skip_steps:
            self._timed_from, self._timed_steps = elapsed, 0
        elif done > self.skip_steps and self._timed_from is not None:
            self._timed_steps = done - self.skip_steps
            seconds_per_step = (elapsed - self._timed_from) / self._timed_steps
            remaining = max(0.0, self.budget_seconds - elapsed)
            self.horizon = step + max(1, int(remaining / max(seconds_per_step, 1e-9)))
            self.frozen = elapsed >= self.measure_share * self.budget_seconds and self._timed_steps >= self.min_steps
        if not self.horizon:  # nothing timed yet: a provisional guess, only the warm-up's first steps use it
            self.horizon = step + 1000
        return self.horizon


def is_due(every_steps: int, every_seconds: float, step: int, seconds_since: float) -> bool:
    """A cadence by steps and/or time (0 = off for that part): due at every N-th step or after T seconds."""
    return bool((every_steps and step % every_steps == 0) or (every_seconds and seconds_since >= every_seconds))
