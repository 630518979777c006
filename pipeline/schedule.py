"""Learning-rate schedule as a pure function of the step: linear warm-up, then cosine or constant.

Being a function of the step alone, it needs no state of its own to resume exactly.
"""

from __future__ import annotations

import math


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
