"""Self-supervised losses as pure functions of embeddings, testable against their definitions."""

from __future__ import annotations

from collections.abc import Sequence

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


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al. 2020, eq. 1).

    The 2N rows of [z1; z2] are L2-normalised. Each of them is an anchor whose positive is the other view
    of the same image (row i of z1 pairs with row i of z2) and whose negatives are the other 2N - 2 rows;
    the anchor itself is left out of its softmax. The loss is the cross-entropy of picking the positive
    among the 2N - 1 candidates, with logits cos(a, b) / temperature, averaged over all 2N anchors.

    Args:
        z1: [N, D] embeddings of the first views, any scale.
        z2: [N, D] embeddings of the second views.
        temperature: the softmax temperature.
    """
    batch_size = len(z1)
    # All in float32, the matmul included: under bf16 autocast the similarities would keep ~3 digits,
    # which dividing by a small temperature turns into errors of several hundredths in the logits.
    with torch.autocast(z1.device.type, enabled=False):
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
        logits = z @ z.T / temperature
    self_pairs = torch.eye(2 * batch_size, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_pairs, float("-inf"))
    # anchor i < N is z1[i], whose positive z2[i] sits at row i + N, and the other way round
    positives = torch.arange(2 * batch_size, device=z.device).roll(batch_size)
    return F.cross_entropy(logits, positives)


def prediction_target_cosine(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """Mean cosine similarity between each view's prediction and the other view's stop-gradient target.

    The shared core of BYOL and SimSiam, both of which predict one view's projection from the other's:
    returns (mean_i cos(p1_i, sg(z2_i)) + mean_i cos(p2_i, sg(z1_i))) / 2, where sg stops the gradient,
    so the targets act as constants. SimSiam's loss is its negative (Chen & He 2021, eq. 2 and 3); BYOL's
    normalised MSE is 2 - 2 times it (Grill et al. 2020, eq. 2).

    Args:
        p1, p2: [N, D] predictions from the first and second views, any scale.
        z1, z2: [N, D] projections (targets) of the first and second views, any scale.
    """
    def mean_cosine(prediction: Tensor, target: Tensor) -> Tensor:
        # In float32: the trainer runs forward under bf16 autocast.
        return F.cosine_similarity(prediction.float(), target.detach().float(), dim=1).mean()

    return (mean_cosine(p1, z2) + mean_cosine(p2, z1)) / 2


def swapped_prediction_loss(scores: Sequence[Tensor], codes: Sequence[Tensor], temperature: float) -> Tensor:
    """SwAV's swapped prediction loss (Caron et al. 2020, eq. 1 and 2), averaged as the official code does.

    For every view i that gives codes q_i, every other view v predicts them with p_v = softmax(scores_v / T);
    the loss is -sum_k q_i log p_v, averaged over the batch, then over the V - 1 predicting views, then over
    the views that give codes.

    Args:
        scores: V tensors [B, K], z_v · C for every view (code views first, then the rest).
        codes: tensors [B, K] for the first len(codes) views (no gradient expected).
        temperature: T of the prediction softmax.
    """
    log_predictions = [F.log_softmax(view_scores.float() / temperature, dim=1) for view_scores in scores]
    total = scores[0].new_zeros((), dtype=torch.float32)
    for code_view, view_codes in enumerate(codes):
        predictors = [log_p for view, log_p in enumerate(log_predictions) if view != code_view]
        cross_entropies = [-(view_codes * log_p).sum(dim=1).mean() for log_p in predictors]
        total = total + torch.stack(cross_entropies).mean()
    return total / len(codes)
