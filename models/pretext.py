"""What the pretext tasks share: classify how an image was transformed, so the backbone must learn what
images look like.

Each task (rotation prediction, models/rotation.py; jigsaw puzzles, models/jigsaw.py) is a head module
whose `forward(backbone, images)` transforms the images itself, runs the backbone on the result and
returns a `PretextOutput`, so the same head serves as a standalone method (in the task's own file) and as
an auxiliary loss on top of any method (models/multitask.py). This module holds the pieces every head
needs: that output, its classifier and its cross-entropy, and the memory layout of transformed batches.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PretextOutput(NamedTuple):
    """What a pretext head returns for one batch.

    Attributes:
        loss: scalar float32 cross-entropy of the transformation classifier, with grad.
        accuracy: detached scalar, share of transformed images whose transformation was named correctly.
        features: backbone features of the transformed batch, with grad (rows as the head documents).
    """

    loss: Tensor
    accuracy: Tensor
    features: Tensor


def transformation_classifier(in_dim: int, hidden_dim: int, classes: int) -> nn.Module:
    """A linear layer (hidden_dim 0) or a one-hidden-layer MLP from features to transformation logits."""
    if hidden_dim == 0:
        return nn.Linear(in_dim, classes)
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, classes))


def classification_output(logits: Tensor, labels: Tensor, features: Tensor) -> PretextOutput:
    """The head's cross-entropy and accuracy for `logits` [N, classes] against the transformations `labels` [N]."""
    logits = logits.float()  # the loss in float32 even under bf16 autocast
    loss = F.cross_entropy(logits, labels)
    accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
    return PretextOutput(loss, accuracy, features)


def in_memory_format_of(images: Tensor, reference: Tensor) -> Tensor:
    """`images` in channels-last layout if `reference` is: the trainer's choice for faster convolutions."""
    if reference.dim() == 4 and reference.is_contiguous(memory_format=torch.channels_last):
        return images.contiguous(memory_format=torch.channels_last)
    return images
