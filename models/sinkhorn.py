"""From SwAV embeddings to codes: scores against the prototypes, then Sinkhorn-Knopp's equal partition.

Pure functions, apart from the method (models/swav.py), so that each can be tested against its definition
(Caron et al. 2020, Sec. 3.1 and Algorithm 1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def prototype_scores(embeddings: Tensor, prototypes: Tensor) -> Tensor:
    """z · C in float32 even under autocast: bf16 scores divided by epsilon = 0.05 would blur the codes."""
    with torch.autocast(embeddings.device.type, enabled=False):
        return embeddings.float() @ prototypes.float().T


@torch.no_grad()
def sinkhorn(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """Soft codes Q for a batch of prototype scores by Sinkhorn-Knopp (SwAV, Sec. 3.1 and Algorithm 1).

    Q = diag(u) · exp(scores / epsilon) · diag(v), with u and v found by alternating normalisations, is the
    entropy-regularised transport of the B samples onto the K prototypes. Marginals, stated on Q itself
    (total mass B):

    * rows (samples): every row sums to exactly 1, so row i is sample i's distribution over prototypes;
    * columns (prototypes): each iteration first rescales the columns so that every prototype holds B/K
      (the equal partition), then rescales the rows to 1. The returned Q ends on the row step, so its
      column sums are B/K only up to that last row rescale, and converge to B/K as `iterations` grows.

    This is the official algorithm (which states the same polytope scaled by 1/B: prototype mass 1/K, sample
    mass 1/B, then multiplies by B), computed in the log domain in float64: every normalisation subtracts
    a log-sum-exp (itself max-shifted), so no exp can overflow or flush a whole row or column to zero, and
    adding a constant to all scores changes nothing. No gradient flows through the codes.

    Args:
        scores: [B, K] similarities of B embeddings to K prototypes (any float dtype).
        epsilon: entropy regularisation; lower gives sharper codes.
        iterations: number of (prototype, sample) normalisation pairs, at least 1.

    Returns:
        [B, K] float32 codes whose rows sum to 1.
    """
    if iterations < 1:
        raise ValueError(f"sinkhorn needs at least one iteration, got {iterations}")
    num_samples, num_prototypes = scores.shape
    log_q = scores.double() / epsilon
    prototype_log_mass = math.log(num_samples / num_prototypes)
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) + prototype_log_mass  # each column: B/K
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)  # each row: 1
    return log_q.exp().float()


def prototype_usage(codes: list[Tensor], num_prototypes: int) -> Tensor:
    """Share of the prototypes that are the top code of at least one row of `codes` (tensors [B, K])."""
    top_codes = torch.cat([view_codes.argmax(dim=1) for view_codes in codes])
    used = torch.zeros(num_prototypes, dtype=torch.bool, device=top_codes.device).index_fill_(0, top_codes, True)
    return used.float().mean()
