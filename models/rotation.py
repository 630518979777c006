"""RotNet: learning features by predicting image rotations (Gidaris et al. 2018, "Unsupervised
Representation Learning by Predicting Image Rotations").

Every image of the batch is shown to the backbone at 0, 90, 180 and 270 degrees, and a classifier on the
features names the rotation. Telling which way is up requires recognising the object and its parts, so
the backbone has to learn them. The head (`RotationHead`) is shared with the auxiliary task that
models/multitask.py adds to other methods. Rotated images are full images, so they update the backbone's
batch-norm running statistics as usual.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from streamssl.models.method import Method, embedding_std
from streamssl.models.pretext import PretextOutput, classification_output, in_memory_format_of, transformation_classifier

ROTATIONS = 4  # 0, 90, 180, 270 degrees


def rotate_batch(images: Tensor) -> tuple[Tensor, Tensor]:
    """All four rotations of every image, and the rotation labels.

    Non-square images are first cropped to their centred square, since a quarter turn would change
    their shape.

    Args:
        images: [B, C, H, W].

    Returns:
        rotated: [4B, C, S, S] with S = min(H, W); rows k*B .. k*B + B - 1 are the batch turned by k * 90
            degrees counter-clockwise (`torch.rot90(x, k, dims=(2, 3))`), so the first B rows are the
            (cropped) images themselves.
        labels: [4B] int64, k for each row.
    """
    side = min(images.shape[-2:])
    top, left = (images.shape[-2] - side) // 2, (images.shape[-1] - side) // 2
    square = images[..., top:top + side, left:left + side]
    rotated = torch.cat([torch.rot90(square, k, dims=(2, 3)) for k in range(ROTATIONS)])
    labels = torch.arange(ROTATIONS, device=images.device).repeat_interleave(len(images))
    return in_memory_format_of(rotated, images), labels


class RotationHead(nn.Module):
    """Predicts which of the four rotations was applied to an image (Gidaris et al. 2018).

    As in the paper, all four rotated copies of every image go into the same batch (rather than one random
    rotation per image), at 4x the backbone cost of one view. The head draws no random numbers.

    Args:
        feature_dim: width of the backbone's features.
        hidden_dim: width of the classifier's hidden layer; 0 gives a single linear layer on the pooled
            features, as in the paper, which leaves all the work to the backbone [0].

    `forward` returns features [4B, feature_dim] in `rotate_batch`'s row order.
    """

    task = "rotation"

    def __init__(self, feature_dim: int, *, hidden_dim: int = 0) -> None:
        super().__init__()
        self.classifier = transformation_classifier(feature_dim, hidden_dim, ROTATIONS)

    def forward(self, backbone: nn.Module, images: Tensor) -> PretextOutput:
        rotated, labels = rotate_batch(images)
        features = backbone(rotated)
        return classification_output(self.classifier(features), labels, features)


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
