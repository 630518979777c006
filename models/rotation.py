"""RotNet: learning features by predicting image rotations (Gidaris et al. 2018, "Unsupervised
Representation Learning by Predicting Image Rotations").

Every image of the batch is shown to the backbone at 0, 90, 180 and 270 degrees, and a classifier on the
features names the rotation. Telling which way is up requires recognising the object and its parts, so
the backbone has to learn them. The math lives in models/pretext.py, shared with the auxiliary head that
models/multitask.py adds to other methods.
"""

from __future__ import annotations

from torch import Tensor, nn

from streamssl.models.method import Method, embedding_std
from streamssl.models.pretext import RotationHead


class Rotation(Method):
    """Rotation prediction as a standalone method: one view, a 4-way cross-entropy.

    Hyper-parameters (keyword-only, defaults in brackets):
        hidden_dim: width of the classifier's hidden layer; 0 is the paper's single linear layer on the
            pooled features [0].

    State: none besides the backbone and the classifier (no random draws either: all four rotations of
    every image are used).

    Logs: `rotation_accuracy` (share of the 4B rotated images whose rotation is named correctly; 0.25 is
    chance), `embedding_std` of the backbone features of the unrotated images (the first quarter of the
    rotated batch, so no extra forward pass).
    """

    name = "rotation"
    num_views = 1

    def __init__(self, backbone: nn.Module, feature_dim: int, *, hidden_dim: int = 0) -> None:
        super().__init__(backbone, feature_dim)
        self.head = RotationHead(feature_dim, hidden_dim=hidden_dim)

    def forward(self, views: list[Tensor], ids: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        images = views[0]
        loss, accuracy, features = self.head(self.backbone, images)  # rotate by k*90, predict k
        unrotated = features[: len(images)].detach()
        return loss, {"rotation_accuracy": accuracy, "embedding_std": embedding_std(unrotated)}
