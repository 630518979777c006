"""Multi-crop embedding (SwAV, Caron et al. 2020, Sec. 3.2): full-size views and small crops through one encoder.

Crops of one size go through the backbone as one batch. Batch norm: every crop is normalised by its own
pass's batch statistics, as in the official code, but only the full-size views' passes update the
backbone's running statistics. The published encoder runs in eval mode on full-size images, so its
running statistics must describe those; 12 px crops give other activation statistics (a different spatial
extent under the same pooling), and the official code's mixing them in would shift them. Running the small
crops first would not help (an EMA keeps every batch's share), so their pass runs under
`running_stats_frozen` (models/bn.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.models.bn import running_stats_frozen


def embed_crops(backbone: nn.Module, head: nn.Module, views: list[Tensor], full_views: int) -> list[Tensor]:
    """L2-normalised float32 embeddings normalize(head(backbone(x))), one [B, dim] tensor per view.

    Args:
        views: `full_views` full-size views, then the small crops; each [B, C, H, W].
        full_views: how many leading views are full-size: only their passes update BN running statistics.
    """
    features = [backbone(torch.cat(run)) for run in same_size_runs(views[:full_views])]
    if len(views) > full_views:
        with running_stats_frozen(backbone):
            features += [backbone(torch.cat(run)) for run in same_size_runs(views[full_views:])]
    # float32 so the codes and the loss do not inherit bf16 from autocast
    embeddings = F.normalize(head(torch.cat(features)).float(), dim=1)
    return list(embeddings.chunk(len(views)))


def same_size_runs(views: list[Tensor]) -> Iterator[list[Tensor]]:
    """Consecutive views of one spatial size, in order: each run can go through the backbone as one batch."""
    start = 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        yield views[start:end]
        start = end
