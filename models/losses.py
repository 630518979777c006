"""Contrastive losses as pure functions of embeddings, testable against their definitions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def info_nce(query: Tensor, positive_key: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """InfoNCE (van den Oord et al. 2018) as used by MoCo, averaged over the N queries.

    For each query q_i the logits are [q_i·k_i, q_i·n_1, ..., q_i·n_K] / temperature and the loss is the
    cross-entropy of picking the positive, index 0: -log(exp(q_i·k_i/T) / sum(exp(logits_i))).

    Args:
        query: [N, D] L2-normalised query embeddings.
        positive_key: [N, D] L2-normalised keys, row i the positive for query i.
        negatives: [K, D] L2-normalised negative keys shared by all queries.
        temperature: T, the softmax temperature.
    """
    positive_logits = (query * positive_key).sum(dim=1, keepdim=True)  # [N, 1]
    negative_logits = query @ negatives.T  # [N, K]
    # Softmax in float32: under bf16 autocast the matmul comes back in bf16, too coarse once divided by T.
    logits = torch.cat([positive_logits, negative_logits], dim=1).float() / temperature
    labels = torch.zeros(len(query), dtype=torch.long, device=query.device)
    return F.cross_entropy(logits, labels)
