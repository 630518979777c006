"""The interface every self-supervised method implements, and the small pieces of math they share.

A method is an `nn.Module` that owns a backbone plus whatever else its paper needs (heads, momentum
encoders, queues, prototypes). The trainer only ever calls `forward(views, ids)` for a loss and logs,
`on_step_end(step)` after the optimizer step, and `encoder()` for the part that gets published. All
state a method needs to continue after a restart lives in its `state_dict` (parameters and buffers),
so the trainer's checkpoint needs nothing method-specific.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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

    def __init__(self, backbone: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim

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
        """Called after every optimizer step; for schedules that live inside the method."""

    def encoder(self) -> nn.Module:
        """The part of the method that gets published: the backbone alone."""
        return self.backbone


def embedding_std(z: Tensor) -> Tensor:
    """Mean over dimensions of the per-dimension std (over the batch) of the L2-normalised rows of z.

    A collapse signal: about 1/sqrt(d) for embeddings spread over the sphere, 0 when all rows coincide.
    """
    return F.normalize(z.float(), dim=1).std(dim=0).mean()


@torch.no_grad()
def momentum_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """Moves every parameter of `target` towards `online`'s: target <- m * target + (1 - m) * online.

    Only parameters: a momentum encoder's BN running statistics come from its own forward passes.
    """
    for target_param, online_param in zip(target.parameters(), online.parameters(), strict=True):
        target_param.mul_(momentum).add_((1 - momentum) * online_param.detach())
