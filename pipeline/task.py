"""What the loop (pipeline/loop.py) drives: a `Task` reading a `Feed`, one `Step` at a time.

One task per job: images (pipeline/images.py), continuous series (pipeline/series/job.py), the offline
forecaster (pipeline/series/forecast.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from torch import nn

from streamssl.models.encoder_io import Manifest
from streamssl.pipeline.loading.messages import Message
from streamssl.pipeline.loading.positions import Position

if TYPE_CHECKING:
    from streamssl.pipeline.loop import Loop


@dataclass
class Step:
    """What one message trained: its loss and logs, the samples it used on this worker, and its learning rate."""

    loss: float
    logs: dict[str, float]
    samples: int
    lr: float = 0.0
    finite: bool = True


class Feed(Protocol):
    def next(self, timeout: float) -> Message:
        """The next message (a data message's or reject's `.position` is the stream right after it; `End` again
        and again once a finite stream is done); raises queue.Empty when nothing arrived within `timeout`."""

    def commit(self, position: Position | None) -> None:
        """Upstream commit (Kafka offsets) of a position that is durably checkpointed."""

    def close(self) -> None: ...


class Task(Protocol):
    """One job's data, model and step; the loop owns everything around them.

    A task may also have `probe_inputs() -> Tensor | None`: real inputs as `encoder()` takes them, which the
    publish gate embeds to refuse a collapsed encoder (pipeline/publish_gate.py); without it that check is skipped.
    """

    map_location: Any  # where checkpoint tensors are loaded to
    quick_eval: bool  # evaluate() takes seconds, not a kNN pass: a signal stop still evaluates and publishes

    @property
    def finished(self) -> str:
        """Why the task itself has ended (early stopping), "" while it goes on."""

    def attach(self, loop: Loop) -> None:
        """Called once by the loop: its state, metrics, dead letters and collective are there."""

    def open(self, position: Position | None) -> Feed: ...

    def step(self, message: Any) -> Step | None:
        """Takes one message; None when it trained nothing (a point that does not fill a batch)."""

    def state_dict(self) -> dict[str, Any]:
        """Everything the next step depends on, besides the loop's counters and the stream position;
        its "rng" entry is what each worker of a group restores for itself."""

    def upgrade(self, ckpt: dict[str, Any]) -> dict[str, Any]:
        """A loaded checkpoint in today's layout (a task whose layout changed converts older ones here)."""

    def load_state_dict(self, ckpt: dict[str, Any]) -> None: ...

    def roll_back(self, ckpt: dict[str, Any]) -> None:
        """Back to a checkpoint's weights, optimizer and RNG, but not its data state (the bad batches are skipped)."""

    def evaluate(self) -> dict[str, float]: ...

    def encoder(self) -> nn.Module | None:
        """What gets published; None while there is nothing to publish yet (logged by the task)."""

    def manifest(self) -> Manifest:
        """What a consumer needs to feed the encoder (the loop fills in step, samples_seen and method, and adds the
        eval metrics to the task's own)."""

    def progress(self, samples_rate: float, seconds: float, loss: float, logs: dict[str, float]) -> str: ...

    def summary(self) -> str:
        """The end of the final `done: …` line, e.g. ", 1280 samples, kNN top-1 …"."""

    def close(self) -> None: ...
