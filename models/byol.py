"""BYOL: Bootstrap Your Own Latent (Grill et al. 2020, "Bootstrap Your Own Latent: A New Approach to
Self-Supervised Learning").

An online network (backbone, projector, predictor) learns to predict, from one view of an image, the
projection of another view made by a target network: an exponential moving average (EMA) of the online
backbone and projector, never trained by gradients. No negatives are needed; the predictor and the slowly
moving target are what keep the representation from collapsing. `forward` follows Algorithm 1 of the
paper; the EMA update runs in `on_step_end`, after the optimizer step, as in the paper, and the one write
`forward` makes (the target's BN statistics) is staged, so a step that is not taken leaves the target alone.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn

from streamssl.models.losses import prediction_target_cosine
from streamssl.models.method import Method, embedding_std, mlp_head, momentum_update


def target_decay(step: Tensor, tau_base: float, tau_end: float, horizon_steps: int) -> Tensor:
    """BYOL's EMA rate after `step` optimizer steps of a run with a horizon of `horizon_steps` steps.

    With a horizon K: τ = τ_end - (τ_end - τ_base)(cos(π p) + 1) / 2 with p = min(1, k / K) (the device-side
    twin of `Method.progress`), a cosine from τ_base at k = 0 to τ_end at k = K, kept after K. The paper's
    schedule (Grill et al. 2020, section 3.2) is τ_end = 1 over the length of training. Without a horizon
    (K = 0, an unbounded stream) there is nothing to anneal to: τ stays τ_base.

    Args:
        step: k, a 0-d tensor (on the device of the parameters, so no host sync is needed).
        tau_base: τ_base, the rate at k = 0 and the rate of an unbounded run.
        tau_end: τ_end, the rate at k = K.
        horizon_steps: K; 0 for an unbounded run.
    """
    if not horizon_steps:
        return torch.full_like(step, tau_base, dtype=torch.float32)
    progress = step.float().clamp(max=horizon_steps) / horizon_steps
    return tau_end - (tau_end - tau_base) * (torch.cos(math.pi * progress) + 1) / 2


class BYOL(Method):
    """BYOL on one device.

    Hyper-parameters (keyword-only, defaults in brackets):
        projection_dim: width of the projection and of the prediction [128] (paper: 256).
        hidden_dim: hidden width of the projector and of the predictor MLPs [512] (paper: 4096).
        tau_base: τ_base, the target's EMA rate at step 0, and its fixed rate on an unbounded stream [0.99];
            the paper's 0.996 suits runs of hundreds of thousands of steps, a faster-moving target (a time
            constant of ~100 steps) suits the short CPU runs and a stream that never anneals.
        tau_end: τ_end, the rate the cosine reaches at the run's horizon [0.999]. The paper anneals to 1, which
            freezes the target for good once the horizon is reached; here the horizon is often an estimate
            (from a time budget) and a run can be resumed past it, so the target keeps moving, if slowly: at
            the end of a cosine-LR run the online network barely moves, so a 1000-step time constant costs
            nothing. 1 gives the paper's schedule.

    The schedule follows the run's horizon (`horizon_steps`, set by the trainer; see `target_decay`): a cosine
    from τ_base to τ_end over the horizon; on an unbounded stream τ stays τ_base, never 1.

    State (parameters and buffers, so a checkpoint of `state_dict()` resumes exactly):
        target_backbone, target_projector: the EMA target network (requires_grad False); its BN running
            statistics come from its own forward passes.
        steps_done: k, optimizer steps taken so far, which sets τ. Only `on_step_end` moves it and the
            target weights, and `forward` only stages its update of the target's BN statistics, so a step the
            trainer does not take (non-finite loss: `discard_step`, no `on_step_end`) leaves all three as
            they were.

    Loss: the normalised MSE 2 - 2 cos(p, sg(z')) of each view's prediction p against the other view's
    target projection z', with sg a stop-gradient, *summed* over the two directions as in the paper
    (Algorithm 1: loss = l(p1, z2') + l(p2, z1')), so it lies in [0, 8] and equals 4 - 4 *
    `prediction_target_cosine` (the mean of the two directions' cosines).

    Logs: `embedding_std` of the online projections (collapse signal), `tau` (the EMA rate the update
    after this step uses), `prediction_target_cosine` (mean cosine between predictions and targets).
    """

    # The State buffers above, registered in __init__; declared so that they type as Tensor, not Tensor | Module.
    steps_done: Tensor

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
        tau_end: float = 0.999,
    ) -> None:
        super().__init__(backbone, feature_dim)
        # τ_base = 1 would freeze the initial random target for ever (an unbounded run never leaves τ_base).
        if not 0.0 <= tau_base < 1.0:
            raise ValueError(f"tau_base must be in [0, 1), got {tau_base}")
        if not tau_base <= tau_end <= 1.0:
            raise ValueError(f"tau_end must be in [tau_base, 1] = [{tau_base}, 1], got {tau_end}")
        self.tau_base = tau_base
        self.tau_end = tau_end

        self.projector = mlp_head(feature_dim, hidden_dim, projection_dim)
        self.predictor = mlp_head(projection_dim, hidden_dim, projection_dim)
        # The target starts as an exact copy of the online backbone + projector and is only moved by EMA.
        self.target_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)

        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    def forward(self, views: list[Tensor], ids: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        x1, x2 = views  # two augmentations of the same images
        z1 = self.projector(self.backbone(x1))  # online projections
        z2 = self.projector(self.backbone(x2))
        p1, p2 = self.predictor(z1), self.predictor(z2)  # online predictions
        t1, t2 = self._target_projections([x1, x2])  # no gradient; its BN statistics update is staged
        cosine = prediction_target_cosine(p1, p2, t1, t2)  # mean of cos(p1, t2) and cos(p2, t1)
        loss = 4 - 4 * cosine  # the paper's sum of the two normalised MSEs ||p̄1 - t̄2||² + ||p̄2 - t̄1||²
        return loss, self._logs(z1, z2, cosine)

    def on_step_end(self, step: int) -> None:
        # `steps_done` equals the trainer's `step` in a consistent run; the buffer is what a checkpoint restores.
        self._update_target_network()
        self.steps_done.add_(1)

    def tau(self) -> Tensor:
        """The EMA rate of the next target update, from the steps done so far and the run's horizon."""
        return target_decay(self.steps_done, self.tau_base, self.tau_end, self.horizon_steps)

    @torch.no_grad()
    def _target_projections(self, views: Sequence[Tensor]) -> list[Tensor]:
        """The target's projection of each view, one pass per view.

        Its BN layers normalise by batch statistics as usual, but update running statistics that are copies
        of the target's buffers; writing them back is staged, so a step that is not taken (a non-finite loss,
        which may come from non-finite activations) leaves the whole target, weights and BN statistics, as it
        was."""
        buffers = [(owner, name, buffer) for network in (self.target_backbone, self.target_projector)
                   for owner in network.modules() for name, buffer in owner.named_buffers(recurse=False)]
        for owner, name, buffer in buffers:
            setattr(owner, name, buffer.clone())
        try:
            projections = [self.target_projector(self.target_backbone(images)) for images in views]
            updated = [getattr(owner, name) for owner, name, _ in buffers]
        finally:
            for owner, name, buffer in buffers:
                setattr(owner, name, buffer)
        self.stage(partial(_copy_all, [buffer for _, _, buffer in buffers], updated))
        return projections

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


def _copy_all(destinations: list[Tensor], sources: list[Tensor]) -> None:
    for destination, source in zip(destinations, sources, strict=True):
        destination.copy_(source)
