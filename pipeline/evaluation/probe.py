"""Label-using evaluations of a frozen or fine-tuned encoder: linear probe and few-label fine-tuning.

* `linear_probe`: features of the frozen encoder (eval mode, no augmentation), standardised with the
  training set's statistics, then a softmax classifier trained on all labelled training images.
* `fine_tune`: the survey's semi-supervised protocol (its Fig. 6): pretrain without labels, then train
  encoder + linear head on a small labelled fraction (stratified, fixed seed) with light crop/flip
  augmentation, and score the test split. With a random encoder it is the supervised-from-scratch baseline.

Both take uint8 images [N,C,H,W]; the encoder takes float pixels in [0, 1] (a published encoder
normalises inside). Both are deterministic for a seed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.pipeline.augment import crop_flip_grids


@torch.no_grad()
def features(encoder: nn.Module, images: Tensor, device: torch.device, batch_size: int = 1024) -> Tensor:
    """Raw (not normalised) embeddings of uint8 images, encoder in eval mode."""
    was_training = encoder.training
    encoder.eval()
    chunks = [encoder(images[start:start + batch_size].to(device).float() / 255.0).float()
              for start in range(0, len(images), batch_size)]
    encoder.train(was_training)
    return torch.cat(chunks)


def train_softmax(inputs: Tensor, labels: Tensor, num_classes: int, steps: int, lr: float, weight_decay: float,
                  batch_size: int, seed: int) -> nn.Linear:
    """A linear softmax classifier trained with Adam on mini-batches drawn with a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the classifier's initial weights
    classifier = nn.Linear(inputs.shape[1], num_classes).to(inputs.device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        index = torch.randint(len(inputs), (batch_size,), generator=gen).to(inputs.device)
        loss = F.cross_entropy(classifier(inputs[index]), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return classifier


def accuracy(predict: Callable[[Tensor], Tensor], inputs: Tensor, labels: Tensor, batch_size: int = 1024) -> float:
    with torch.no_grad():
        correct = sum(int((predict(inputs[start:start + batch_size]).argmax(1).cpu() == labels[start:start + batch_size]
                           .cpu()).sum()) for start in range(0, len(inputs), batch_size))
    return correct / len(inputs)


def linear_probe(encoder: nn.Module, train_images: Tensor, train_labels: Tensor, test_images: Tensor,
                 test_labels: Tensor, device: torch.device, steps: int = 3000, seed: int = 0) -> float:
    """Test top-1 (0..1) of a softmax classifier on the frozen encoder's standardised features."""
    train_x, test_x = features(encoder, train_images, device), features(encoder, test_images, device)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    num_classes = int(train_labels.max()) + 1
    classifier = train_softmax(train_x, train_labels.to(device), num_classes, steps, lr=1e-3, weight_decay=1e-5,
                               batch_size=512, seed=seed)
    return accuracy(classifier, test_x, test_labels)


def labelled_fraction(labels: np.ndarray | Tensor, fraction: float, seed: int) -> np.ndarray:
    """Indices of a stratified random `fraction` of the labelled set (at least one image per class)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = max(1, round(fraction * len(members)))
        picked.append(rng.choice(members, size=count, replace=False))
    return np.sort(np.concatenate(picked))


class _Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.head(self.encoder(pixels))


def fine_tune(encoder: nn.Module, train_images: Tensor, train_labels: Tensor, test_images: Tensor,
              test_labels: Tensor, device: torch.device, steps: int = 1000, batch_size: int = 128,
              lr: float = 0.05, seed: int = 0) -> float:
    """Test top-1 (0..1) after fine-tuning a copy of `encoder` plus a linear head on the given labelled set."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    num_classes = int(train_labels.max()) + 1
    feature_dim = features(encoder, train_images[:2], device).shape[1]
    model = _Classifier(copy.deepcopy(encoder), feature_dim, num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    labels = train_labels.to(device)
    model.train()
    for _ in range(steps):
        index = torch.randint(len(train_images), (batch_size,), generator=gen)
        pixels = train_images[index].to(device).float() / 255.0
        # light augmentation only (the labels are few; strong SSL augmentation would fight them)
        grids = crop_flip_grids(len(pixels), pixels.shape[-1], (0.6, 1.0), (0.8, 1.25), 0.5, gen, torch.device("cpu"))
        pixels = F.grid_sample(pixels, grids.to(device), mode="bilinear", padding_mode="reflection", align_corners=False)
        loss = F.cross_entropy(model(pixels), labels[index.to(device)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    test_pixels = test_images.float() / 255.0
    return accuracy(lambda x: model(x.to(device)), test_pixels, test_labels)
