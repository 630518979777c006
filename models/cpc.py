"""CPC: Contrastive Predictive Coding (van den Oord et al. 2018, "Representation Learning with Contrastive
Predictive Coding") for windows of a time series.

An encoder turns a window into a sequence of latents z_t; an autoregressive GRU summarises z_<=t into a
context c_t; for every k in 1..K a linear map W_k turns c_t into a prediction of z_{t+k}. InfoNCE (the
paper's eq. 4) trains the prediction to pick its true future latent out of the latents that other windows
of the batch have at the same time step, plus, optionally, latents of earlier batches kept in a queue.
`forward` follows the paper's Figure 1 / Section 2.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.models.method import Method, embedding_std, momentum_update
from streamssl.models.ring import write_ring
from streamssl.models.series_backbones import PooledSeriesEncoder, SeriesEncoder


def multi_step_info_nce(predictions: Tensor, latents: Tensor, temperature: float, negatives: Tensor | None = None,
                        negatives_valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """CPC's InfoNCE for every prediction step k, each averaged over windows and time steps.

    The prediction of step k made at time t for window b is predictions[b, t, k-1]; its positive is
    latents[b, t+k]; its negatives are latents[b', t+k] for every other window b' of the batch, and every
    row of `negatives`. Time steps with t + k >= T' have no target and are left out. With logits
    s = p·z / temperature the loss of one prediction is -log(exp(s_pos) / sum over candidates exp(s)).

    Args:
        predictions: [B, T', K, D] L2-normalised predictions.
        latents: [B, T', D] L2-normalised latents.
        temperature: softmax temperature.
        negatives: [Q, D] L2-normalised extra negatives shared by every prediction (a queue), or None.
        negatives_valid: [Q] bool, False for rows of `negatives` that hold no latent yet (left out).

    Returns:
        (loss, accuracy), both [K]: the mean loss of step k, and how often the positive got the top logit.
    """
    batch_size, length, steps, _ = predictions.shape
    if length <= steps:
        raise ValueError(f"CPC needs more latent steps than prediction steps; got {length} latents for "
                         f"{steps} prediction steps (use longer windows or fewer prediction steps)")
    losses, accuracies = [], []
    # float32 throughout: under bf16 autocast the similarities would keep ~3 digits before dividing by T
    with torch.autocast(predictions.device.type, enabled=False):
        for step in range(1, steps + 1):
            predicted = predictions[:, :length - step, step - 1].float()  # [B, S, D] made at t = 0..S-1
            target = latents[:, step:].float()  # [B, S, D] z_{t+k}
            logits = torch.einsum("bsd,csd->sbc", predicted, target)  # [S, B, B]: window b against every c
            if negatives is not None:
                extra = torch.einsum("bsd,qd->sbq", predicted, negatives.float())
                if negatives_valid is not None:
                    extra = extra.masked_fill(~negatives_valid, float("-inf"))
                logits = torch.cat([logits, extra], dim=2)
            logits = logits / temperature
            labels = torch.arange(batch_size, device=logits.device).expand(len(logits), batch_size)  # the diagonal
            losses.append(F.cross_entropy(logits.flatten(0, 1), labels.flatten()))
            accuracies.append((logits.argmax(dim=2) == labels).float().mean())
    return torch.stack(losses), torch.stack(accuracies)


class CPC(Method):
    """CPC on windows [B, C, T] of one or more series, one view per window (no augmentation needed).

    Hyper-parameters (keyword-only, defaults in brackets; chosen for windows of 128 points, batch 64,
    the default encoder: 16 latents per window):
        context_dim: width of the GRU context c_t [64].
        prediction_steps: K, how many future latents each context predicts [4].
        temperature: of the InfoNCE softmax over cosine similarities [0.2: on sine windows 0.1 first
            collapsed for ~50 steps and 0.2 learned fastest; on ElectricDevices 0.1, 0.2 and 0.5 probed
            within 1.5 points of each other after 30 s]. Predictions and latents are L2-normalised (the paper scores
            with an unnormalised bilinear exp(z W_k c)); normalising keeps queued latents from earlier steps
            on the same scale as the current ones.
        queue_size: latents of earlier batches kept as extra negatives; 0 = in-batch negatives only, the
            paper's CPC [0]. Every target latent of every window is enqueued (B * T' per step), so the queue
            holds the last queue_size / (B * T') batches. Slots not yet written are not used as negatives.
        momentum: with a queue, the target latents z (positives, in-batch and queued negatives) come from a
            copy of the encoder that follows it by momentum, m * copy + (1 - m) * encoder before every
            forward, as MoCo's keys do [0.99]; the encoder learns through the context path. Why: queued
            latents from the trained encoder itself made CPC collapse on sine windows and ElectricDevices
            (embedding std -> 0; MoCo's m = 0 ablation fails alike), also after 300 in-batch steps first;
            and with online targets but momentum-encoded queue rows, the two were told apart trivially
            and the in-batch latents collapsed.

    State (parameters and buffers, so `state_dict()` resumes exactly):
        key_backbone: the momentum copy of the encoder (only with a queue);
        queue: [queue_size, feature_dim] L2-normalised target latents; queue_ptr: next row to write;
        latents_enqueued: latents written so far.

    Logs: `cpc_accuracy` (how often a prediction picks its positive, mean over steps; chance is about
    1 / (B + filled queue)), `cpc_loss_step{k}`, `embedding_std` of the pooled features (collapse signal),
    and `queue_fill` when there is a queue (share of its rows that served as negatives this step).
    """

    # The State buffers above, registered in __init__; declared so that they type as Tensor, not Tensor | Module.
    queue: Tensor
    queue_ptr: Tensor
    latents_enqueued: Tensor

    name = "cpc"
    num_views = 1

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        context_dim: int = 64,
        prediction_steps: int = 4,
        temperature: float = 0.2,
        queue_size: int = 0,
        momentum: float = 0.99,
    ) -> None:
        super().__init__(backbone, feature_dim)
        if prediction_steps < 1 or queue_size < 0 or context_dim < 1 or temperature <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"CPC: need context_dim >= 1, prediction_steps >= 1, temperature > 0, queue_size >= 0, "
                             f"0 <= momentum < 1; got {context_dim}, {prediction_steps}, {temperature}, {queue_size}, "
                             f"{momentum}")
        self.prediction_steps = prediction_steps
        self.temperature = temperature
        self.momentum = momentum
        # with a queue, targets come from this slowly moving copy (see `momentum` above)
        self.key_backbone = copy.deepcopy(backbone).requires_grad_(False) if queue_size else None
        self.context = nn.GRU(feature_dim, context_dim, batch_first=True)  # g_ar
        # W_1..W_K as one matrix: one matmul for all steps; no bias, as in the paper's z^T W_k c
        self.predictors = nn.Linear(context_dim, prediction_steps * feature_dim, bias=False)
        self.register_buffer("queue", torch.zeros(queue_size, feature_dim))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("latents_enqueued", torch.zeros((), dtype=torch.long))

    def forward(self, views: list[Tensor], ids: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        (windows,) = views
        z = self.backbone(windows).transpose(1, 2)  # z_t = g_enc(x_t): [B, T', D]
        c, _ = self.context(z)  # c_t = g_ar(z_<=t): [B, T', context_dim]
        batch_size, length, _ = z.shape
        predictions = self.predictors(c).view(batch_size, length, self.prediction_steps, self.feature_dim)  # W_k c_t
        predictions = F.normalize(predictions.float(), dim=3)
        if self.key_backbone is None:
            latents, negatives, valid = F.normalize(z.float(), dim=2), None, None
        else:
            latents = self._key_latents(windows)  # no gradient, like MoCo's keys
            # A copy: the queue is overwritten in place below while autograd still needs these negatives.
            negatives, valid = self.queue.clone(), self._filled_slots()
        losses, accuracies = multi_step_info_nce(predictions, latents, self.temperature, negatives, valid)
        if self.key_backbone is not None:  # staged: only a step that is taken moves the key encoder and the queue
            self.stage(self._momentum_update_key_encoder)
            self.stage(self._dequeue_and_enqueue, latents.flatten(0, 1))
        return losses.mean(), self._logs(z, losses, accuracies, valid)

    def encoder(self) -> nn.Module:
        """The published module: windows [B, C, T] -> pooled latents [B, feature_dim] (shares the weights)."""
        if not isinstance(self.backbone, SeriesEncoder):
            raise TypeError(f"CPC.encoder() needs a SeriesEncoder backbone, got {type(self.backbone).__name__}")
        return PooledSeriesEncoder(self.backbone)

    @torch.no_grad()
    def _key_latents(self, windows: Tensor) -> Tensor:
        assert self.key_backbone is not None  # only used with a queue, which builds it
        return F.normalize(self.key_backbone(windows).transpose(1, 2).float(), dim=2)

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        assert self.key_backbone is not None  # only staged with a queue, which builds it
        momentum_update(self.key_backbone, self.backbone, self.momentum)

    def _filled_slots(self) -> Tensor:
        # On the device, from the counter: no host sync per step.
        return torch.arange(len(self.queue), device=self.queue.device) < self.latents_enqueued

    @torch.no_grad()
    def _dequeue_and_enqueue(self, latents: Tensor) -> None:
        """Writes `latents` over the oldest rows of the ring buffer, wrapping around its end."""
        write_ring(self.queue, self.queue_ptr, self.latents_enqueued, latents)

    @torch.no_grad()
    def _logs(self, z: Tensor, losses: Tensor, accuracies: Tensor, queue_used: Tensor | None) -> dict[str, Tensor]:
        logs = {"cpc_accuracy": accuracies.mean(), "embedding_std": embedding_std(z.mean(dim=1))}
        logs.update({f"cpc_loss_step{step}": loss.detach() for step, loss in enumerate(losses, start=1)})
        if queue_used is not None:
            logs["queue_fill"] = queue_used.float().mean()
        return logs
