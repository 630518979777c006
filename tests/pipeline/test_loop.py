"""The one loop (pipeline/loop.py) around a small real task: a linear model trained by SGD on a counter feed.

No image or series stack: stop reasons, checkpoint and publish cadence, exact resume, non-finite steps skipped
and rolled back, giving up with TrainingDiverged, the task's own end, and the checkpoint upgrade hook.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from streamssl.models.encoder_io import Manifest
from streamssl.pipeline.config import Config, load_config
from streamssl.pipeline.loading.messages import End
from streamssl.pipeline.loop import Loop, TrainingDiverged
from streamssl.pipeline.task import Feed, Step
from streamssl.streams.series_source import SeriesFilePosition


def after(n: int) -> SeriesFilePosition:
    """The position after message n (a series file's, the simplest kind the loop knows: "row" n + 1)."""
    return SeriesFilePosition("counter", n + 1)


class Tick:
    def __init__(self, n: int) -> None:
        self.n, self.position = n, after(n)


class Counter:
    """Messages 0, 1, 2, … (or up to `end`); the position is the next message's number."""

    def __init__(self, start: int, end: int | None) -> None:
        self.n, self.end = start, end
        self.committed: list[SeriesFilePosition | None] = []

    def next(self, timeout: float) -> Tick | End:
        if self.end is not None and self.n >= self.end:
            return End()
        self.n += 1
        return Tick(self.n - 1)

    def commit(self, position: Any) -> None:
        self.committed.append(position)

    def close(self) -> None: ...


class LinearTask:
    """Fits y = 3x on inputs drawn from the message number; `poison` makes those messages' losses NaN."""

    map_location = "cpu"
    quick_eval = True

    def __init__(self, poison: set[int] = frozenset(), end: int | None = None, stop_after: int = 0) -> None:
        torch.manual_seed(0)
        self.model = nn.Linear(1, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05)
        self.poison, self.end, self.stop_after = poison, end, stop_after
        self.trained: list[int] = []
        self.upgraded = 0
        self.loop: Loop | None = None

    @property
    def finished(self) -> str:
        return "enough" if self.stop_after and len(self.trained) >= self.stop_after else ""

    def attach(self, loop: Loop) -> None:
        self.loop = loop

    def open(self, position: Any) -> Feed:
        self.feed = Counter(0 if position is None else position.row, self.end)
        return self.feed

    def step(self, message: Tick) -> Step:
        x = torch.tensor([[float(message.n % 7) / 7]])
        loss = ((self.model(x) - 3 * x) ** 2).mean()
        if message.n in self.poison:
            loss = loss * float("nan")
        self.optimizer.zero_grad()
        if not torch.isfinite(loss):
            return Step(float(loss.detach()), {}, 1, finite=False)
        loss.backward()
        self.optimizer.step()
        self.trained.append(message.n)
        return Step(float(loss.detach()), {"x": float(x)}, 1, lr=0.05)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def upgrade(self, ckpt: dict[str, Any]) -> dict[str, Any]:
        self.upgraded += 1
        return ckpt

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        self.roll_back(ckpt)

    def roll_back(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])

    def evaluate(self) -> dict[str, float]:
        return {"weight": float(self.model.weight.detach())}

    def encoder(self) -> nn.Module:
        return self.model

    def manifest(self) -> Manifest:
        return Manifest(backbone="linear", input={"features": 1}, embedding_dim=1)

    def progress(self, samples_rate: float, seconds: float, loss: float, logs: dict[str, float]) -> str:
        return f"loss {loss}"

    def summary(self) -> str:
        return ""

    def close(self) -> None: ...


def config(run_dir: Path, *sets: str) -> Config:
    return load_config(sets=[f"run_dir={run_dir}", "train.max_minutes=0", "checkpoint.every_steps=3",
                             "checkpoint.every_seconds=0", "eval.every_steps=0", "eval.every_seconds=0",
                             "eval.dataset=none", "metrics.port=0", "train.log_every_seconds=1000", *sets])


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(path.name for path in (run_dir / "checkpoints").glob("ckpt-*.pt"))


def test_max_steps_checkpoint_and_publish_cadence(tmp_path: Path) -> None:
    task = LinearTask()
    loop = Loop(config(tmp_path, "train.max_steps=7", "checkpoint.publish_every=0", "checkpoint.keep=5"), task)
    state = loop.run()
    assert (state.step, state.samples_seen, state.checkpoints_written) == (7, 7, 3)
    assert checkpoints(tmp_path) == ["ckpt-000000003.pt", "ckpt-000000006.pt", "ckpt-000000007.pt"]
    assert loop.publisher.latest_version() == 1 and state.published_step == 7  # only at the end
    assert state.eval_step == 7 and state.eval_metrics == {"weight": float(task.model.weight.detach())}
    assert task.feed.committed == [after(2), after(5), after(6)]  # upstream commits follow durable checkpoints
    assert state.position == after(6) and task.trained == list(range(7))


def test_resume_continues_exactly_where_a_straight_run_is(tmp_path: Path) -> None:
    straight = LinearTask()
    Loop(config(tmp_path / "straight", "train.max_steps=8"), straight).run()
    first = LinearTask()
    Loop(config(tmp_path / "resumed", "train.max_steps=5"), first).run()
    second = LinearTask()
    second.model.weight.data.fill_(123.0)  # whatever the fresh task holds is replaced by the checkpoint
    state = Loop(config(tmp_path / "resumed", "train.max_steps=8"), second).run()
    assert second.upgraded == 1 and second.trained == [5, 6, 7] and state.step == 8
    for a, b in zip(straight.model.parameters(), second.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_non_finite_steps_are_skipped_then_rolled_back(tmp_path: Path) -> None:
    task = LinearTask(poison={4, 5, 6})
    loop = Loop(config(tmp_path, "train.max_steps=6", "train.nan_rollback_after=3"), task)
    state = loop.run()
    # step 3 was checkpointed, message 3 trained step 4, messages 4-6 are NaN: skipped, then back to step 3 and
    # ckpt-3's weights, but the stream goes on (the bad messages are not replayed)
    assert task.trained == [0, 1, 2, 3, 7, 8, 9] and state.step == 6 and state.position == after(9)
    sample = loop.metrics.registry.get_sample_value
    assert sample("streamssl_rollbacks_total") == 1 and sample("streamssl_skipped_steps_total") == 3


def test_training_that_stays_non_finite_gives_up(tmp_path: Path) -> None:
    task = LinearTask(poison=set(range(3, 100)))
    with pytest.raises(TrainingDiverged, match="2 rollbacks did not help"):
        Loop(config(tmp_path, "train.max_steps=50", "train.nan_rollback_after=2", "train.max_rollbacks=2"), task).run()


def test_the_task_and_the_stream_can_end_the_run(tmp_path: Path) -> None:
    task = LinearTask(stop_after=4)
    state = Loop(config(tmp_path / "task"), task).run()
    assert state.step == 4 and state.published_step == 4 and checkpoints(tmp_path / "task")[-1] == "ckpt-000000004.pt"
    finite = LinearTask(end=5)
    loop = Loop(config(tmp_path / "stream"), finite)
    state = loop.run()
    assert state.step == 5 and state.position == after(4) and state.published_step == 5
