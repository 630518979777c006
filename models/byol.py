"""BYOL: Bootstrap Your Own Latent (Grill et al. 2020, "Bootstrap Your Own Latent: A New Approach to
Self-Supervised Learning").

An online network (backbone, projector, predictor) learns to predict, from one view of an image, the
projection of another view made by a target network: an exponential moving average (EMA) of the online
backbone and projector, never trained by gradients. No negatives are needed; the predictor and the slowly
moving target are what keep the representation from collapsing. `forward` follows Algorithm 1 of the
paper; the EMA update runs in `on_step_end`, after the optimizer step, as in the paper.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from streamssl.models.losses import prediction_target_cosine
from streamssl.models.method import Method, embedding_std, momentum_update


def target_decay(step: Tensor, tau_base: float, horizon_steps: int) -> Tensor:
    """BYOL's EMA rate after `step` optimizer steps: τ = 1 - (1 - τ_base)(cos(π k / K) + 1) / 2.

    Rises from τ_base at k = 0 to 1 at k = K (Grill et al. 2020, section 3.2) and stays at 1 after K. The
    paper's K is the length of training; a stream has no end, so K is a horizon in steps.

    Args:
        step: k, a 0-d tensor (on the device of the parameters, so no host sync is needed).
        tau_base: τ_base, the rate at k = 0.
        horizon_steps: K.
    """
    progress = step.float().clamp(max=horizon_steps) / horizon_steps
    return 1 - (1 - tau_base) * (torch.cos(math.pi * progress) + 1) / 2


def _mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """BYOL's projector and predictor shape: Linear-BN-ReLU-Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
    )


class BYOL(Method):
    """BYOL on one device.

    Hyper-parameters (keyword-only, defaults in brackets):
        projection_dim: width of the projection and of the prediction [128] (paper: 256).
        hidden_dim: hidden width of the projector and of the predictor MLPs [512] (paper: 4096).
        tau_base: τ_base, the target's EMA rate at step 0 [0.99]; the paper's 0.996 suits runs of
            hundreds of thousands of steps, a faster-moving target suits the short CPU runs.
        tau_horizon_steps: K, steps over which τ rises to 1 on a cosine [10000]; τ stays 1 after K, which
            freezes the target, so set K to about the length of the run.

    State (parameters and buffers, so a checkpoint of `state_dict()` resumes exactly):
        target_backbone, target_projector: the EMA target network (requires_grad False); its BN running
            statistics come from its own forward passes.
        steps_done: k, optimizer steps taken so far, which sets τ.

    Loss: the normalised MSE 2 - 2 cos(p, sg(z')) of each view's prediction p against the other view's
    target projection z', with sg a stop-gradient. The paper *sums* the two directions; here they are
    *averaged*, so the loss lies in [0, 4] and equals 2 - 2 * `prediction_target_cosine`. With SGD this
    halves the gradient against the paper's sum, like halving the learning rate (weight decay aside).

    Logs: `embedding_std` of the online projections (collapse signal), `tau` (the EMA rate the update
    after this step uses), `prediction_target_cosine` (mean cosine between predictions and targets).
    """

    name = "byol"
    num_views = 2

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        projection_dim: int = 128,
        hidden_dim: int = 512,
        tau_base: float = 0.99,
        tau_horizon_steps: int = 10000,
    ) -> None:
        super().__init__(backbone, feature_dim)
        if not 0.0 <= tau_base <= 1.0:
            raise ValueError(f"tau_base must be in [0, 1], got {tau_base}")
        if tau_horizon_steps < 1:
            raise ValueError(f"tau_horizon_steps must be >= 1, got {tau_horizon_steps}")
        self.tau_base = tau_base
        self.tau_horizon_steps = tau_horizon_steps

        self.projector = _mlp(feature_dim, hidden_dim, projection_dim)
        self.predictor = _mlp(projection_dim, hidden_dim, projection_dim)
        # The target starts as an exact copy of the online backbone + projector and is only moved by EMA.
        self.target_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)

        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def forward(self, views: list[Tensor], ids: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        x1, x2 = views  # two augmentations of the same images
        z1 = self.projector(self.backbone(x1))  # online projections
        z2 = self.projector(self.backbone(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)  # online predictions
        t1, t2 = self._target_projections(x1), self._target_projections(x2)  # no gradient
        cosine = prediction_target_cosine(p1, p2, t1, t2)  # p1 against t2, p2 against t1
        loss = 2 - 2 * cosine  # the average of the two normalised MSEs ||p̄ - t̄'||²
        return loss, self._logs(z1, z2, cosine)

    def on_step_end(self, step: int) -> None:
        # `steps_done` equals the trainer's `step` in a consistent run; the buffer is what a checkpoint restores.
        self._update_target_network()
        self.steps_done.add_(1)

    def tau(self) -> Tensor:
        """The EMA rate of the next target update, from the steps done so far."""
        return target_decay(self.steps_done, self.tau_base, self.tau_horizon_steps)

    @torch.no_grad()
    def _target_projections(self, images: Tensor) -> Tensor:
        return self.target_projector(self.target_backbone(images))

    @torch.no_grad()
    def _update_target_network(self) -> None:
        # τ stays a 0-d tensor on the parameters' device (momentum_update's arithmetic takes it like a
        # float): turning it into a float would cost a host sync every step.
        tau = self.tau()
        momentum_update(self.target_backbone, self.backbone, tau)
        momentum_update(self.target_projector, self.projector, tau)

    @torch.no_grad()
    def _logs(self, z1: Tensor, z2: Tensor, cosine: Tensor) -> dict[str, Tensor]:
        return {
            "embedding_std": embedding_std(torch.cat([z1, z2])),
            "tau": self.tau(),
            "prediction_target_cosine": cosine.detach(),
        }
