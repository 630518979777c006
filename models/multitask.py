"""Auxiliary pretext tasks on top of any method: multi-task learning with one shared backbone (Caruana 1997,
"Multitask Learning").

`MultiTask(inner, {"rotation": 0.5, "jigsaw": 0.1})` trains the inner method as usual and adds, for each
task with a non-zero weight, a pretext head (models/pretext.py; the rotation and jigsaw heads live in
models/rotation.py and models/jigsaw.py) on the inner method's backbone:

    total loss = inner loss + sum over tasks t of weight_t * loss_t

The pretext tasks see the first full-size view, `views[0]`. To the trainer the wrapper looks like the
inner method: same name, number of views, multi-crop settings, schedule hook and published encoder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor, nn

from streamssl.models.jigsaw import JigsawHead
from streamssl.models.method import Method, ViewSpec
from streamssl.models.pretext import PretextOutput
from streamssl.models.rotation import RotationHead

# Task name -> head factory taking the backbone's feature width; the heads' own defaults apply. The order
# here is the order the heads run in, and so the order of their random draws.
AUX_TASKS: dict[str, Callable[[int], nn.Module]] = {"rotation": RotationHead, "jigsaw": JigsawHead}


class MultiTask(Method):
    """Any method plus weighted auxiliary pretext losses, all on the inner method's backbone.

    Args:
        inner: the method being trained, already built.
        weights: task name (a key of AUX_TASKS) -> weight >= 0 of its loss; a task with weight 0, or left
            out, gets no head and costs nothing.

    State dict layout: `inner.<the inner method's own keys>` (e.g. `inner.backbone.block1.conv.weight`,
    `inner.queue`) and `heads.<task>.<head keys>` (e.g. `heads.rotation.classifier.weight`,
    `heads.jigsaw.permutations`). The backbone appears once, under `inner.`.

    Logs: the inner method's logs, plus for each task `aux_<task>_loss` (unweighted) and
    `<task>_accuracy`.
    """

    def __init__(self, inner: Method, weights: Mapping[str, float]) -> None:
        unknown = sorted(set(weights) - set(AUX_TASKS))
        if unknown:
            raise ValueError(f"unknown auxiliary task(s): {', '.join(unknown)}; valid: {', '.join(AUX_TASKS)}")
        negative = sorted(task for task, weight in weights.items() if weight < 0)
        if negative:
            raise ValueError(f"auxiliary weights must be >= 0, got {', '.join(f'{t}={weights[t]}' for t in negative)}")
        # Not Method.__init__: it would register the shared backbone a second time, as `backbone.*` next to
        # `inner.backbone.*` in the state dict.
        nn.Module.__init__(self)
        self.inner = inner
        self.feature_dim = inner.feature_dim
        self.weights = {task: float(weights[task]) for task in AUX_TASKS if weights.get(task, 0.0) > 0}
        self.heads = nn.ModuleDict({task: AUX_TASKS[task](inner.feature_dim) for task in self.weights})

    def forward(self, views: list[Tensor], ids: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        loss, logs = self.inner(views, ids)
        logs = dict(logs)
        for task, head in self.heads.items():
            aux: PretextOutput = head(self.backbone, views[0])
            loss = loss + self.weights[task] * aux.loss
            logs[f"aux_{task}_loss"] = aux.loss.detach()
            logs[f"{task}_accuracy"] = aux.accuracy
        return loss, logs

    def on_step_end(self, step: int) -> None:
        self.inner.on_step_end(step)

    # The inner method's staged writes, optimizer resets and horizon are the wrapper's.

    def commit_step(self) -> None:
        self.inner.commit_step()

    def discard_step(self) -> None:
        self.inner.discard_step()

    def take_reset_parameters(self) -> list[Tensor]:
        return self.inner.take_reset_parameters()

    @property
    def horizon_steps(self) -> int:
        return self.inner.horizon_steps

    @horizon_steps.setter
    def horizon_steps(self, steps: int) -> None:
        self.inner.horizon_steps = steps

    def encoder(self) -> nn.Module:
        return self.inner.encoder()

    def views(self) -> ViewSpec:  # the inner method's: the aux heads use its first view
        return self.inner.views()

    @property
    def backbone(self) -> nn.Module:  # type: ignore[override]
        return self.inner.backbone

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name
