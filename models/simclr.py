"""SimCLR: a Simple framework for Contrastive Learning of visual Representations (Chen et al. 2020, "A Simple
Framework for Contrastive Learning of Visual Representations").

Two views of every image in a batch are embedded by one network (backbone + MLP head); each embedding has
to pick out its partner view among all 2N - 1 other embeddings of the batch (NT-Xent). The negatives are
the other images of the same batch, so there is no queue or momentum encoder: nothing but the weights to
checkpoint. `forward` follows Algorithm 1 of the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.models.losses import nt_xent
from streamssl.models.method import Method, embedding_std


class SimCLR(Method):
    """SimCLR on one device.

    Hyper-parameters (keyword-only, defaults in brackets):
        dim: width of the head's output z, where the loss is computed [128] (the paper's).
        temperature: τ of the NT-Xent softmax [0.2]. The paper's best values are 0.1-0.5 depending on
            batch size and training length (0.5 in its CIFAR-10 runs); 0.2 matches this project's MoCo.

    Head: Linear-ReLU-Linear with hidden width = the backbone's feature width (paper section 2.1, g(h)).

    Logs: `embedding_std` of the head outputs (collapse signal), `positive_similarity` (mean cosine
    between the two views' embeddings of an image).
    """

    name = "simclr"
    num_views = 2

    def __init__(self, backbone: nn.Module, feature_dim: int, *, dim: int = 128, temperature: float = 0.2) -> None:
        super().__init__(backbone, feature_dim)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.head = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(inplace=True), nn.Linear(feature_dim, dim))

    def forward(self, views: list[Tensor], ids: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        x1, x2 = views  # two augmentations of the same images
        z1, z2 = self.head(self.backbone(x1)), self.head(self.backbone(x2))  # z = g(f(x))
        loss = nt_xent(z1, z2, self.temperature)  # over all 2N embeddings
        return loss, self._logs(z1, z2)

    @torch.no_grad()
    def _logs(self, z1: Tensor, z2: Tensor) -> dict[str, Tensor]:
        return {
            "embedding_std": embedding_std(torch.cat([z1, z2])),
            "positive_similarity": F.cosine_similarity(z1.float(), z2.float(), dim=1).mean(),
        }
