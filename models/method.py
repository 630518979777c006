"""The interface every self-supervised method implements, and the small pieces of math they share.

A method is an `nn.Module` that owns a backbone plus whatever else its paper needs (heads, momentum
encoders, queues, prototypes). Per step the trainer calls `forward(views, ids)` for a loss and logs; if
the loss is finite it takes the optimizer step, then `commit_step()` (the state writes `forward` staged:
queue and bank writes, so a non-finite step cannot poison them) and `on_step_end(step)`; if not, it
calls `discard_step()`. `encoder()` is the part that gets published. All state a method needs to
continue after a restart lives in its `state_dict` (parameters and buffers), so the trainer's checkpoint
needs nothing method-specific.

Schedules inside a method follow the run's horizon: the trainer sets `horizon_steps` (the step the run
anneals to: `train.max_steps`, or a horizon estimated from the time budget; 0 for an unbounded stream)
before every step, and `progress(step)` turns it into a fraction. A method's recipe (optimizer,
learning rate, BN splits, …) is `recipe`, config defaults that apply unless the user sets the key.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ViewSpec:
    """The views `forward` expects of each image: `full` full-size ones, then `small` crops of `small_size`
    pixels covering `small_scale` (min, max) of the image area (SwAV's multi-crop)."""

    full: int
    small: int = 0
    small_size: int = 0
    small_scale: tuple[float, float] = (0.05, 0.4)


class Method(nn.Module, ABC):
    """Base class of the SSL methods.

    Attributes:
        name: registry name of the method, e.g. "moco".
        num_views: how many full-size augmented views of each image `forward` expects.
        small_crops: multi-crop (SwAV): how many extra low-resolution crops follow the full-size views.
        small_crop_size: their side in pixels.
        small_crop_scale: (min, max) share of the image area each small crop covers.
        backbone: the encoder that is trained and published.
        feature_dim: width of the backbone's output.
    """

    name: ClassVar[str]
    num_views: ClassVar[int] = 2
    small_crops: int = 0
    small_crop_size: int = 0
    small_crop_scale: tuple[float, float] = (0.05, 0.4)
    # Config defaults of this method ("optim.lr": 0.5, "model.bn_splits": 1, …); a key the user sets wins.
    recipe: ClassVar[dict[str, Any]] = {}

    def __init__(self, backbone: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.horizon_steps = 0  # set by the trainer before each step; 0 = unbounded (no end to anneal to)
        self._staged: list[Callable[[], None]] = []
        self._reset: list[Tensor] = []

    def views(self) -> ViewSpec:
        """What the augmentation makes of each image for this method."""
        return ViewSpec(self.num_views, self.small_crops, self.small_crop_size, self.small_crop_scale)

    @abstractmethod
    def forward(self, views: list[Tensor], ids: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns the loss (scalar, with grad) and logs (detached scalar tensors) for one batch.

        Args:
            views: `num_views` full-size views, then `small_crops` small ones; each [B, C, H, W], row i
                of every view is an augmentation of the same record.
            ids: [B] int64, a stable id per record (a hash of its key: the same record always has the
                same id, across restarts); methods that remember instances (NPID, DeepCluster) need it.
        """

    def on_step_end(self, step: int) -> None:
        """Called after every optimizer step (after `commit_step`); for schedules that live inside the method."""

    def progress(self, step: int | Tensor) -> float | None:
        """Share of the run's horizon done after `step` steps, in [0, 1]; None for an unbounded run."""
        if not self.horizon_steps:
            return None
        return min(1.0, float(step) / self.horizon_steps)

    def reached(self, steps_done: int | Tensor, share: float, steps: int) -> bool:
        """Whether `steps_done` steps reach a point of a schedule: `share` of the horizon, or `steps` steps in an
        unbounded run (SwAV's queue start and prototype freeze, DeepCluster's clusterings)."""
        done = self.progress(steps_done)
        return bool(steps_done >= steps) if done is None else done >= share

    # --- state writes that only a taken step may make ---------------------------------------------
    def stage(self, write: Callable[..., None], *args: Any) -> None:
        """Defers a state write `write(*args)` (enqueue, bank update) from `forward` until the step is known to be
        taken. Tensors in `args` are the ones computed in this forward (e.g. gathered keys)."""
        self._staged.append(functools.partial(write, *args))

    @torch.no_grad()
    def commit_step(self) -> None:
        """Applies the writes `forward` staged, in order; the trainer calls it after a taken optimizer step."""
        staged, self._staged = self._staged, []
        for write in staged:
            write()

    def discard_step(self) -> None:
        """Drops the staged writes of a step that was not taken (non-finite loss)."""
        self._staged = []

    # Tensor, not nn.Parameter: torch types a layer's parameters (nn.Linear.weight, …) as Tensor, and the
    # optimizer's state is keyed by Tensor.
    def reset_optimizer_state(self, *params: Tensor) -> None:
        """Asks the trainer to drop the optimizer state (momentum, Adam moments) of re-initialised parameters."""
        self._reset.extend(params)

    def take_reset_parameters(self) -> list[Tensor]:
        reset, self._reset = self._reset, []
        return reset

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups: weight decay and LARS adaptation only for weights, not for BN and biases
        (1-d parameters), as the LARS, BYOL and SwAV recipes do. A method may override it (e.g. SimSiam's
        predictor at a fixed LR: a group with `"fixed_lr": True`)."""
        return split_decay(self.named_parameters())

    def encoder(self) -> nn.Module:
        """The part of the method that gets published: the backbone alone."""
        return self.backbone


def split_decay(named: Iterable[tuple[str, nn.Parameter]]) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: weights (decayed, LARS-adapted) and 1-d ones (BN, biases: neither)."""
    weights: list[nn.Parameter] = []
    others: list[nn.Parameter] = []
    for _, param in named:
        if param.requires_grad:
            (weights if param.ndim > 1 else others).append(param)
    return [{"params": weights}, {"params": others, "weight_decay": 0.0, "lars_exclude": True}]


def embedding_std(z: Tensor) -> Tensor:
    """Mean over dimensions of the per-dimension std (over the batch) of the L2-normalised rows of z.

    A collapse signal: about 1/sqrt(d) for embeddings spread over the sphere, 0 when all rows coincide.
    """
    return F.normalize(z.float(), dim=1).std(dim=0).mean()


@torch.no_grad()
def momentum_update(target: nn.Module, online: nn.Module, momentum: float | Tensor) -> None:
    """Moves every parameter of `target` towards `online`'s: target <- m * target + (1 - m) * online.

    `momentum` may be a 0-d tensor on the parameters' device (BYOL's scheduled τ), which saves a host sync.
    Only parameters: a momentum encoder's BN running statistics come from its own forward passes.
    """
    for target_param, online_param in zip(target.parameters(), online.parameters(), strict=True):
        target_param.mul_(momentum).add_((1 - momentum) * online_param.detach())


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear-BN-ReLU-Linear: BYOL's projector and predictor, SwAV's and DeepCluster-v2's projection head."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
    )
