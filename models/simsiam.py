"""SimSiam: Simple Siamese representation learning (Chen & He 2021, "Exploring Simple Siamese
Representation Learning").

One network (backbone + projector) embeds two views of an image; a predictor MLP maps one view's
projection onto the other's, which is held fixed by a stop-gradient. No negatives, no momentum encoder,
no large batch: the paper shows the stop-gradient is what prevents collapse. `forward` follows
Algorithm 1 of the paper.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from streamssl.models.losses import prediction_target_cosine
from streamssl.models.method import Method, embedding_std


class SimSiam(Method):
    """SimSiam on one device.

    Hyper-parameters (keyword-only, defaults in brackets):
        dim: width of the projection z and of the prediction p [256] (paper: 2048 on a ResNet-50).
        pred_hidden_dim: bottleneck width of the predictor [64], a quarter of `dim` as in the paper
            (2048 -> 512 -> 2048).

    Projector (paper section 4.4 and its code): three Linear layers, each followed by BN, with ReLU after
    the first two; hidden width = the backbone's feature width; the output BN has no learnable affine.
    Predictor: Linear-BN-ReLU-Linear through the bottleneck. Linear layers followed by BN have no bias,
    which BN would cancel.

    Loss: D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2 with D the negative cosine similarity and sg a
    stop-gradient; it lies in [-1, 1] and reaches -1 when every prediction points at its target.

    Logs: `embedding_std` of the projections z (the paper's collapse signal, section 4.1),
    `prediction_target_cosine` (mean cosine between predictions and targets, = -loss).
    """

    name = "simsiam"
    num_views = 2

    def __init__(self, backbone: nn.Module, feature_dim: int, *, dim: int = 256, pred_hidden_dim: int = 64) -> None:
        super().__init__(backbone, feature_dim)
        self.projector = nn.Sequential(
            nn.Linear(feature_dim, feature_dim, bias=False), nn.BatchNorm1d(feature_dim), nn.ReLU(inplace=True),
            nn.Linear(feature_dim, feature_dim, bias=False), nn.BatchNorm1d(feature_dim), nn.ReLU(inplace=True),
            nn.Linear(feature_dim, dim, bias=False), nn.BatchNorm1d(dim, affine=False),
        )
        self.predictor = nn.Sequential(
            nn.Linear(dim, pred_hidden_dim, bias=False), nn.BatchNorm1d(pred_hidden_dim), nn.ReLU(inplace=True),
            nn.Linear(pred_hidden_dim, dim),
        )

    def forward(self, views: list[Tensor], ids: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        x1, x2 = views  # two augmentations of the same images
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))  # projections
        p1, p2 = self.predictor(z1), self.predictor(z2)  # predictions
        cosine = prediction_target_cosine(p1, p2, z1, z2)  # stops the gradient through z1 and z2 as targets
        loss = -cosine  # D(p1, z2) / 2 + D(p2, z1) / 2
        return loss, self._logs(z1, z2, cosine)

    @torch.no_grad()
    def _logs(self, z1: Tensor, z2: Tensor, cosine: Tensor) -> dict[str, Tensor]:
        return {"embedding_std": embedding_std(torch.cat([z1, z2])), "prediction_target_cosine": cosine.detach()}
