"""SwAV: Swapping Assignments between Views (Caron et al. 2020, "Unsupervised Learning of Visual Features by
Contrasting Cluster Assignments").

`forward` is the paper's Algorithm 1 and the official training loop: normalise the prototypes, embed all
crops (models/multicrop.py), score them against the prototypes, turn each full-size view's scores into soft
codes that spread the batch evenly over the prototypes (Sinkhorn-Knopp without gradient, models/sinkhorn.py;
optionally with a queue of earlier embeddings to enlarge the problem), and let every other view of the image
predict those codes (the swapped cross-entropy, models/losses.py). The queue write is staged (`Method.stage`),
so only a step that is taken changes the queue.
"""

from __future__ import annotations

import logging
import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.models.distributed import gather_from_all
from streamssl.models.losses import swapped_prediction_loss
from streamssl.models.method import Method, embedding_std, mlp_head
from streamssl.models.multicrop import embed_crops
from streamssl.models.ring import push_newest_first
from streamssl.models.sinkhorn import prototype_scores, prototype_usage, sinkhorn

log = logging.getLogger(__name__)


class SwAV(Method):
    """SwAV with multi-crop, a feature queue and a prototype freeze, on one device.

    Hyper-parameters (keyword-only, defaults in brackets, chosen for the CPU default of 28x28 Fashion-MNIST,
    batch 256 and runs of a few hundred to a few thousand steps):
        dim: width of the projected, L2-normalised embedding [128, as in the paper].
        num_prototypes: K, number of prototype vectors [100]. Sinkhorn's equal partition gives each prototype
            B/K of the B rows' mass while each row sums to 1; with K > B no code entry can exceed B/K < 1 and
            every sample is smeared over at least K/B prototypes, so the codes cannot become assignments (the
            paper needs its queue for this: 3000 prototypes at batch 256). K must stay below the batch size
            for the steps before the queue joins, and 100 does at batch 256 (2.56 rows per prototype, 12.8
            once the 1024 queued rows join) while still over-clustering Fashion-MNIST's 10 classes 10x (the
            paper over-clusters ImageNet's 1000 3x). `forward` warns once when a step has fewer rows than K.
        temperature: T of the prediction softmax [0.1, the paper's].
        epsilon: Sinkhorn entropy regularisation [0.05, the paper's].
        sinkhorn_iterations: Sinkhorn normalisation pairs [3, the paper's].
        small_crops: low-resolution crops per image after the two full-size views; they only predict codes,
            never give them [4: the paper uses 6; 4 of 12 px add about 0.75 of a 28 px view's compute, a
            step ~1.4x a two-view one on a CPU].
        small_crop_size: their side in pixels [12: 12/28 matches the paper's 96/224].
        small_crop_scale: (min, max) share of the image area each small crop covers [(0.05, 0.4): wider than
            the paper's (0.05, 0.14), since a 28 px item loses its shape in tinier crops].
        queue_size: embeddings of earlier batches kept per full-size view and prepended to the batch's scores
            for Sinkhorn; 0 disables it [1024: the paper adds a queue (3840) at batch 256, as the equal
            partition over one small batch is too tight; 4 batches keeps the queued features fresh in short
            runs and Sinkhorn cheap].
        queue_start: share of the run's horizon after which batches are enqueued, for a run with a horizon;
            the queue joins Sinkhorn only once full, since a part-empty queue can make training explode
            (lightly #1148) [0.15: the official code starts it after 15 of 200 epochs (7.5%); a short run
            spends a larger share of itself in the fast-moving early phase, where 4-step-old embeddings are
            stale, and with K < B the batch alone already gives a well-posed partition, so waiting costs
            little; 0.15 also lets the prototypes train for 10% of the run after the freeze first].
        queue_start_step: the same in steps, for an unbounded run (no horizon) [500: about two passes over
            Fashion-MNIST's 60k images, after the prototypes unfreeze and the early phase of training].
        freeze_prototypes: share of the run's horizon during which the prototypes get no gradient, for a run
            with a horizon; as in the official code, it lets the embeddings settle around the random
            prototypes first [0.05: the official code freezes one epoch, 0.1-0.5% of its runs but hundreds
            of steps; that share of a 270-1200 step run would be 1-6 steps, 5% is 14-60].
        freeze_prototypes_steps: the same in steps, for an unbounded run [250: the official code freezes
            about one epoch; one pass over Fashion-MNIST's 60k images is ~234 steps].

    The two schedules are `Method.reached` points: shares of the horizon the trainer set (the same on every
    worker), or step counts in an unbounded run. Once the queue has taken a batch it keeps taking every batch,
    even if a re-estimated horizon moves the start later: a full queue that stopped being refreshed would
    feed Sinkhorn ever staler embeddings.

    Batch norm: every crop is normalised by its own pass's batch statistics, but only the full-size views'
    passes update the backbone's running statistics, which the published encoder uses on full-size images
    (models/multicrop.py says why).

    State (buffers and parameters, so `state_dict()` resumes exactly):
        prototypes.weight: [K, dim] prototypes, rows renormalised to unit length before each use.
        queue: [2, queue_size, dim] float32 embeddings of earlier batches per full-size view, newest first.
        features_enqueued: embeddings written to each view's queue so far (the fill counter; > 0 also
            records that the queue has started).
        step: optimizer steps done, advanced by `on_step_end`; drives the freeze and queue schedules.

    Logs: `embedding_std` of the full-size views' embeddings (collapse signal); `loss_over_ln_k`, the loss
    divided by ln K (the loss of uniform predictions: a value stuck near 1 means collapse); `queue_fill`
    (share of the queue holding embeddings once this step's staged enqueue is committed, 0 without a queue;
    it is used from the step after it reaches 1); `prototype_usage` (share of prototypes that are the top
    code of at least one sample of the batch in either full-size view).

    Each forward reads the two counters from the device once (the trainer reads the loss every step anyway).
    """

    # The State buffers above, registered in __init__; declared so that they type as Tensor, not Tensor | Module.
    queue: Tensor
    features_enqueued: Tensor
    step: Tensor

    name = "swav"
    num_views = 2

    def __init__(
        self, backbone: nn.Module, feature_dim: int, *, dim: int = 128, num_prototypes: int = 100,
        temperature: float = 0.1, epsilon: float = 0.05, sinkhorn_iterations: int = 3,
        small_crops: int = 4, small_crop_size: int = 12, small_crop_scale: tuple[float, float] = (0.05, 0.4),
        queue_size: int = 1024, queue_start: float = 0.15, queue_start_step: int = 500,
        freeze_prototypes: float = 0.05, freeze_prototypes_steps: int = 250,
    ) -> None:
        super().__init__(backbone, feature_dim)
        if sinkhorn_iterations < 1:
            raise ValueError(f"sinkhorn_iterations must be >= 1, got {sinkhorn_iterations}")
        if queue_size < 0 or small_crops < 0:
            raise ValueError("queue_size and small_crops must be >= 0")
        if not (0.0 <= queue_start <= 1.0 and 0.0 <= freeze_prototypes <= 1.0):
            raise ValueError(f"queue_start and freeze_prototypes are shares of the horizon, in [0, 1]; got "
                             f"{queue_start} and {freeze_prototypes}")
        if queue_start_step < 0 or freeze_prototypes_steps < 0:
            raise ValueError("queue_start_step and freeze_prototypes_steps must be >= 0")
        self.temperature, self.epsilon, self.sinkhorn_iterations = temperature, epsilon, sinkhorn_iterations
        self.small_crops, self.small_crop_size = small_crops, small_crop_size
        self.small_crop_scale = (float(small_crop_scale[0]), float(small_crop_scale[1]))
        self.queue_size, self.queue_start, self.queue_start_step = queue_size, queue_start, queue_start_step
        self.freeze_prototypes, self.freeze_prototypes_steps = freeze_prototypes, freeze_prototypes_steps
        self._warned_few_rows = False

        self.head = mlp_head(feature_dim, feature_dim, dim)
        self.prototypes = nn.Linear(dim, num_prototypes, bias=False)
        self._normalize_prototypes()

        self.register_buffer("queue", torch.zeros(self.num_views, queue_size, dim))
        self.register_buffer("features_enqueued", torch.zeros((), dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, views: list[Tensor], ids: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        self._normalize_prototypes()  # C <- C / ||C|| row-wise, at the start of every step as the official code
        steps_done, features_enqueued = torch.stack([self.step, self.features_enqueued]).tolist()
        embeddings = embed_crops(self.backbone, self.head, views, self.num_views)  # z = normalize(head(backbone(x)))
        prototypes = self.prototypes.weight
        if self.prototypes_frozen(steps_done):
            prototypes = prototypes.detach()  # no path to the prototypes: their .grad stays None, SGD skips them
        scores = [prototype_scores(z, prototypes) for z in embeddings]  # z · C
        # The queue was full before this batch: only then may it take part (a part-empty one can explode).
        queue_is_full = self.queue_size > 0 and features_enqueued >= self.queue_size
        self._check_sinkhorn_rows(len(scores[0]) + (self.queue_size if queue_is_full else 0))
        codes = [self._codes(scores[view], prototypes, view, queue_is_full) for view in range(self.num_views)]
        enqueued = 0
        if self.queue_size > 0 and (features_enqueued > 0 or self.queue_started(steps_done)):
            # [views, B, dim]; with several workers every queue takes the global batch (workers x B rows).
            # Staged: the trainer writes it only if this step's loss is finite and the step is taken.
            batch = gather_from_all(torch.stack(embeddings[: self.num_views]), dim=1).detach()
            self.stage(partial(self._enqueue, batch))
            enqueued = batch.shape[1]
        loss = swapped_prediction_loss(scores, codes, self.temperature)  # every other view predicts q
        return loss, self._logs(loss, embeddings[: self.num_views], codes, enqueued)

    def on_step_end(self, step: int) -> None:
        self.step.fill_(step + 1)

    def prototypes_frozen(self, steps_done: int) -> bool:
        """Whether the step after `steps_done` steps leaves the prototypes without gradient."""
        return not self.reached(steps_done, self.freeze_prototypes, self.freeze_prototypes_steps)

    def queue_started(self, steps_done: int) -> bool:
        """Whether the queue's schedule has reached its start after `steps_done` steps."""
        return self.reached(steps_done, self.queue_start, self.queue_start_step)

    def _check_sinkhorn_rows(self, rows: int) -> None:
        num_prototypes = self.prototypes.weight.shape[0]
        if rows < num_prototypes and not self._warned_few_rows:
            self._warned_few_rows = True
            log.warning("swav: Sinkhorn has %d rows for %d prototypes, so its equal partition forces every code "
                        "to spread over >= %.1f prototypes; use swav.num_prototypes below the batch size",
                        rows, num_prototypes, num_prototypes / rows)

    @torch.no_grad()
    def _codes(self, scores: Tensor, prototypes: Tensor, view: int, use_queue: bool) -> Tensor:
        """Sinkhorn codes of one full-size view; with the queue, its rows join the problem and are dropped after."""
        batch_size = len(scores)
        if use_queue:
            scores = torch.cat([prototype_scores(self.queue[view], prototypes), scores])
        return sinkhorn(scores.detach(), self.epsilon, self.sinkhorn_iterations)[-batch_size:]

    @torch.no_grad()
    def _enqueue(self, embeddings: Tensor) -> None:
        """Pushes [2, B, dim] embeddings to the front of each view's queue; the oldest fall off the end."""
        push_newest_first(self.queue, self.features_enqueued, embeddings)

    @torch.no_grad()
    def _normalize_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    @torch.no_grad()
    def _logs(self, loss: Tensor, embeddings: list[Tensor], codes: list[Tensor], enqueued: int) -> dict[str, Tensor]:
        num_prototypes = self.prototypes.weight.shape[0]
        # 0 without a queue: nothing is ever enqueued then
        queue_fill = ((self.features_enqueued + enqueued).float() / max(self.queue_size, 1)).clamp(max=1.0)
        return {
            "embedding_std": embedding_std(torch.cat(embeddings)),
            "loss_over_ln_k": loss.detach() / math.log(num_prototypes),
            "queue_fill": queue_fill,
            "prototype_usage": prototype_usage(codes, num_prototypes),
        }
