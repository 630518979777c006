"""Non-finite losses: each skips its step; repeated ones roll back to the last checkpoint, and a run that
keeps diverging stops with one readable error instead of training on garbage."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamssl.pipeline.cli import main
from streamssl.pipeline.images import Trainer
from tests.conftest import tiny_config


def test_repeated_nan_rolls_back_to_the_last_checkpoint_and_skips_the_bad_batches(tmp_path: Path,
                                                                                   small_lake: Path) -> None:
    # A loss that turns NaN for a few batches mid-run cannot be produced on demand by real data, so the
    # method's forward is wrapped to poison three calls; everything else (checkpoints, restore) is real.
    trainer = Trainer(tiny_config(tmp_path / "run", small_lake, "train.max_steps=8"))
    real_forward = trainer.method.forward
    calls = {"n": 0}

    def poisoned(views, ids=None):
        calls["n"] += 1
        loss, logs = real_forward(views, ids)
        return (loss * float("nan"), logs) if 6 <= calls["n"] <= 8 else (loss, logs)

    trainer.method.forward = poisoned
    positions: list[int] = []
    real_step = trainer.task.step

    def recording_step(batch):
        positions.append(batch.position.sample_index + 128 * batch.position.shard_index)
        return real_step(batch)

    trainer.task.step = recording_step
    state = trainer.run()

    # Steps 1-5 ran, the 6th-8th calls were NaN: the third one rolled back to the checkpoint of step 4.
    assert trainer.metrics.rollbacks._value.get() == 1
    assert trainer.metrics.skipped_steps._value.get() == 3
    assert state.step == 8
    # 8 good steps + 1 good step lost to the rollback + 3 poisoned batches, and never a batch twice.
    assert calls["n"] == 12
    assert len(set(positions)) == len(positions) == 12


def test_a_loss_that_is_never_finite_stops_the_run_with_one_line(tmp_path: Path, small_lake: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # Temperature 0 divides the logits by zero: a real configuration that diverges from the first step.
    sets = [f"run_dir={tmp_path / 'run'}", f"data.source={small_lake}", "data.mode=cycle", "metrics.port=0",
            "eval.dataset=none", "train.batch_size=32", "model.bn_splits=4", "moco.temperature=0.0",
            "train.max_steps=20", "checkpoint.every_steps=2"]
    code = main(["run", *[arg for item in sets for arg in ("--set", item)]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("streamssl: error: loss was not finite for 3 steps in a row and no checkpoint")
