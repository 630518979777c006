"""Distillation against an earlier encoder, CaSSLe-style (Fini et al., "Self-Supervised Models are Continual
Learners", CVPR 2022), for every image method.

A predictor g maps the current encoder's features of the first view to what a frozen snapshot of the encoder
computes for the same view; the loss is added to the method's with weight `distill.weight`:

    loss = method loss + weight * (2 - 2 cos(g(f(x)), stopgrad(f_snapshot(x))))

CaSSLe uses each method's own loss as the distillation loss; we use the negative cosine of BYOL/SimSiam for all
methods (one predictor and one loss that needs no negatives, queue or prototypes). On a stream there are no
task boundaries to take the snapshot at: it is refreshed every `distill.every_steps` steps, and there is no
distillation before the first snapshot (the random initial encoder is nothing to remember). The snapshot is
kept in eval mode (its BN statistics frozen with its weights). Snapshot, predictor and the step of the snapshot
are in `state_dict`; the predictor's parameters train with the method's optimizer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Distiller(nn.Module):
    """Snapshot + predictor.

    Args:
        build_encoder: A fresh encoder of the same architecture (the snapshot is a copy of the weights into
            it, not a deep copy of the live module, which would also copy its hooks).
        feature_dim: Width of the encoder's features.
        weight: Weight of the distillation loss.
        every_steps: Snapshot refresh period in steps.
    """

    def __init__(self, build_encoder: Callable[[], nn.Module], feature_dim: int, weight: float, every_steps: int) -> None:
        super().__init__()
        self.weight, self.every_steps = weight, every_steps
        self.snapshot = build_encoder().requires_grad_(False).eval()
        hidden = 2 * feature_dim
        self.predictor = nn.Sequential(nn.Linear(feature_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                       nn.Linear(hidden, feature_dim))
        self.register_buffer("snapshot_step", torch.tensor(-1))  # -1: no snapshot yet

    snapshot_step: Tensor

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.snapshot.eval()  # frozen, BN statistics included
        return self

    @property
    def active(self) -> bool:
        return int(self.snapshot_step) >= 0

    def loss(self, features: Tensor, first_view: Tensor) -> Tensor:
        """The distillation loss of the current features (with grad) of `first_view`."""
        with torch.no_grad():
            target = self.snapshot(first_view).float()
        prediction = self.predictor(features.float())
        return 2 - 2 * F.cosine_similarity(prediction, target, dim=1).mean()

    @torch.no_grad()
    def maybe_refresh(self, step: int, encoder: nn.Module) -> bool:
        """Takes a new snapshot of `encoder` every `every_steps` steps; True when it did."""
        if step % self.every_steps:
            return False
        self.snapshot.load_state_dict(encoder.state_dict())
        self.snapshot_step.fill_(step)
        return True

    def logs(self, step: int) -> dict[str, float]:
        return {"snapshot_age": float(step - int(self.snapshot_step)) if self.active else -1.0}
