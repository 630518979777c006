"""Weighted kNN monitor (Wu et al. 2018): cosine similarity, top-k neighbours vote with exp(sim/T).

The standard SSL monitor (k=200, T=0.1). `knn_predict` is the pure math; `KnnMonitor` embeds a
labelled reference bank and a held-out test set with the current encoder.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.pipeline.augment import normalise


def knn_predict(queries: Tensor, bank: Tensor, bank_labels: Tensor, num_classes: int,
                k: int = 200, temperature: float = 0.1) -> Tensor:
    """Predicted class per query. `queries` [N,D] and `bank` [M,D] must be L2-normalised."""
    k = min(k, bank.shape[0])
    similarity = queries @ bank.T
    top_sim, top_idx = similarity.topk(k, dim=1)
    weights = (top_sim / temperature).exp()
    votes = torch.zeros(queries.shape[0], num_classes, device=queries.device, dtype=weights.dtype)
    votes.scatter_add_(1, bank_labels[top_idx], weights)
    return votes.argmax(dim=1)


@torch.no_grad()
def embed(encoder: nn.Module, images: Tensor, mean: list[float], std: list[float],
          device: torch.device, batch_size: int = 1024, autocast: bool = False) -> Tensor:
    """L2-normalised embeddings of uint8 images [N,C,H,W], in eval mode, computed in batches."""
    was_training = encoder.training
    encoder.eval()
    chunks = []
    for start in range(0, images.shape[0], batch_size):
        batch = normalise(images[start:start + batch_size].to(device), mean, std)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            chunks.append(F.normalize(encoder(batch).float(), dim=1))
    encoder.train(was_training)
    return torch.cat(chunks)


def knn_top1(encoder: nn.Module, bank_images: Tensor, bank_labels: Tensor, test_images: Tensor,
             test_labels: Tensor, mean: list[float], std: list[float], device: torch.device,
             k: int = 200, temperature: float = 0.1, autocast: bool = False) -> float:
    """kNN top-1 accuracy (0..1) of `encoder` on a labelled bank and test set."""
    bank = embed(encoder, bank_images, mean, std, device, autocast=autocast)
    queries = embed(encoder, test_images, mean, std, device, autocast=autocast)
    num_classes = int(max(bank_labels.max(), test_labels.max())) + 1
    correct = 0
    for start in range(0, queries.shape[0], 1024):  # bounded memory for the similarity matrix
        predicted = knn_predict(queries[start:start + 1024], bank, bank_labels.to(device), num_classes, k, temperature)
        correct += int((predicted.cpu() == test_labels[start:start + 1024]).sum())
    return correct / queries.shape[0]


def subset(images: np.ndarray, labels: np.ndarray, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """A fixed random subset (size 0 or larger than the set = all), as [N,1,H,W] uint8 and int64 labels."""
    if 0 < size < len(images):
        index = np.random.default_rng(seed).permutation(len(images))[:size]
        images, labels = images[index], labels[index]
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(1)
    return tensor, torch.from_numpy(np.asarray(labels, dtype=np.int64))
