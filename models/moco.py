"""MoCo: Momentum Contrast (He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation
Learning"), with the MoCo v2 changes (Chen et al. 2020, "Improved Baselines with Momentum Contrastive
Learning": MLP projection head, lower temperature, stronger augmentation — the last one lives in the
pipeline).

A query encoder (backbone + head) is trained to pick its key — the same image under another
augmentation, embedded by a slowly moving copy of the query encoder — out of a queue of keys from
earlier batches. The queue gives many negatives without a large batch; the momentum copy keeps the
keys in that queue consistent with each other. `forward` follows Algorithm 1 of the paper.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.models.distributed import gather_from_all, world_size
from streamssl.models.losses import info_nce
from streamssl.models.method import Method, embedding_std, momentum_update
from streamssl.models.ring import write_ring


class MoCo(Method):
    """MoCo v1/v2 on one device.

    Hyper-parameters (keyword-only, defaults in brackets):
        dim: width of the projected, L2-normalised embedding [128].
        queue_size: K, number of negative keys kept from earlier batches [4096].
        momentum: m, key encoder <- m * key encoder + (1 - m) * query encoder, every step [0.99].
        temperature: T of the InfoNCE softmax [0.1; MoCo v2 uses 0.2 for ImageNet, 0.1 trained better here].
        mlp: MoCo v2's 2-layer MLP head (Linear-ReLU-Linear); False gives v1's single Linear [True].
        symmetric: also contrast the second view's queries with the first view's keys and average the
            two losses; both key batches are enqueued [False].

    State (buffers, so a checkpoint of `state_dict()` resumes exactly):
        queue: [K, dim] float32 keys, initially random unit vectors.
        queue_ptr: row where the next key is written.
        keys_enqueued: keys written so far, for the `queue_fill` log.

    Logs: `queue_fill` (share of the queue holding real keys after this step's enqueue; below 1 the
    random initial vectors still serve as negatives), `embedding_std` of the queries (collapse signal),
    `positive_similarity` (mean q·k).

    Batch shuffling around the key encoder only changes anything when the backbone was built with
    `bn_splits > 1`: it sends a query and its key to different BN groups, so the key encoder's batch
    statistics cannot tell the query encoder which key is its positive.
    """

    # The State buffers above, registered in __init__; declared so that they type as Tensor, not Tensor | Module.
    queue: Tensor
    queue_ptr: Tensor
    keys_enqueued: Tensor

    name = "moco"
    num_views = 2
    # Shuffle BN needs split BN on one device (see the class docstring). Batch 64: four times the steps per
    # sample seen, measured +1.8 points of full-set kNN at 70k samples over batch 256 (docs/BENCHMARKS.md).
    recipe: ClassVar[dict[str, Any]] = {"model.bn_splits": 8, "train.batch_size": 64}

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        *,
        dim: int = 128,
        queue_size: int = 4096,
        momentum: float = 0.99,
        temperature: float = 0.1,
        mlp: bool = True,
        symmetric: bool = False,
    ) -> None:
        super().__init__(backbone, feature_dim)
        self.momentum = momentum
        self.temperature = temperature
        self.symmetric = symmetric

        if mlp:
            self.head: nn.Module = nn.Sequential(
                nn.Linear(feature_dim, feature_dim), nn.ReLU(inplace=True), nn.Linear(feature_dim, dim)
            )
        else:
            self.head = nn.Linear(feature_dim, dim)
        # The key encoder starts as an exact copy and is never trained by gradients, only by momentum.
        self.key_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.key_head = copy.deepcopy(self.head).requires_grad_(False)

        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("keys_enqueued", torch.zeros((), dtype=torch.long))

    def forward(self, views: list[Tensor], ids: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        x1, x2 = views  # two augmentations of the same images
        q1 = self._encode_queries(x1)  # q = f_q(x_q)
        k2 = self._encode_keys_with_shuffled_batch(x2)  # k = f_k(x_k), no gradient
        # A copy: the queue is overwritten in place below while autograd still needs these negatives.
        negatives = self.queue.clone()
        if self.symmetric:
            q2 = self._encode_queries(x2)
            k1 = self._encode_keys_with_shuffled_batch(x1)
            loss = (info_nce(q1, k2, negatives, self.temperature)
                    + info_nce(q2, k1, negatives, self.temperature)) / 2
            # row i of queries pairs with row i of keys
            queries, keys = torch.cat([q1, q2]), torch.cat([k2, k1])
        else:
            loss = info_nce(q1, k2, negatives, self.temperature)
            queries, keys = q1, k2
        # Algorithm 1 after the update of f_q: f_k moves towards it, the newest keys go in and the oldest out;
        # staged, so only a step that is taken changes them. With several workers every worker enqueues the
        # whole global batch.
        self.stage(self._momentum_update_key_encoder)
        self.stage(self._dequeue_and_enqueue, gather_from_all(keys))
        return loss, self._logs(queries, keys)

    def _encode_queries(self, images: Tensor) -> Tensor:
        # float32 so the loss math does not inherit bf16 from autocast
        return F.normalize(self.head(self.backbone(images)).float(), dim=1)

    @torch.no_grad()
    def _encode_keys_with_shuffled_batch(self, images: Tensor) -> Tensor:
        # Drawn on the CPU from torch's default generator: the same order on CPU and CUDA, reproducible
        # from torch.get_rng_state() alone, which the trainer checkpoints.
        order = torch.randperm(len(images)).to(images.device)
        keys = self.key_head(self.key_backbone(images[order]))
        return F.normalize(keys.float(), dim=1)[torch.argsort(order)]

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        momentum_update(self.key_backbone, self.backbone, self.momentum)
        momentum_update(self.key_head, self.head, self.momentum)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: Tensor) -> None:
        """Writes `keys` over the oldest entries of the ring buffer, wrapping around its end."""
        write_ring(self.queue, self.queue_ptr, self.keys_enqueued, keys)

    @torch.no_grad()
    def _logs(self, queries: Tensor, keys: Tensor) -> dict[str, Tensor]:
        return {
            # after this step's enqueue (staged until the step is taken)
            "queue_fill": ((self.keys_enqueued + len(keys) * world_size()).float() / len(self.queue)).clamp(max=1.0),
            "embedding_std": embedding_std(queries),
            "positive_similarity": (queries * keys).sum(dim=1).mean(),
        }
