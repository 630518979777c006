"""Embedding drift: how far the stream's latest records have moved from a reference window, seen by the encoder.

The measure is a domain classifier's ROC AUC (as Evidently measures embedding drift; its default alarm is 0.55):
a logistic regression learns to tell reference embeddings from recent ones, and its AUC on held-out
cross-validation folds (never on the rows it was fitted to) is the drift: 0.5 = the windows are
indistinguishable, 1 = fully separable. Chosen over an MMD because its scale is fixed whatever the embedding
dimension, the kernel or how spread the encoder's embeddings are at this point of training, so one threshold
serves every run at every step.

The reference window is the first `drift.window` records of the run; the recent window is a ring of the latest
`drift.window` records that arrived after them (replayed records are not new data and never enter). Both hold
decoded uint8 images, not embeddings: at each eval both are embedded by the same current weights, so the AUC
measures the data, not the encoder changing under it. Both are restart state (`state_dict`): a resumed run
compares with the same reference and continues exactly where a run that never stopped would be.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.pipeline.evaluation.knn import embed

log = logging.getLogger(__name__)


def roc_auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve of `scores` for binary `labels` (1 = positive): the chance that a random positive
    scores above a random negative, ties counting half (the Mann-Whitney U statistic over n_pos x n_neg)."""
    order = scores.argsort()
    _, inverse, counts = torch.unique_consecutive(scores[order], return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1) / 2  # 1-based ranks, tied scores sharing their mean rank
    ranks = torch.empty(len(scores), dtype=torch.float64)
    ranks[order] = mean_rank[inverse]
    positive = labels == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        raise ValueError("roc_auc needs both classes")
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fit_logistic(features: Tensor, targets: Tensor, weight_decay: float, steps: int = 100) -> tuple[Tensor, Tensor]:
    """(weight, bias) of an L2-penalised logistic regression: mean log loss + weight_decay / 2 x |weight|^2, by
    full-batch L-BFGS (deterministic: no sampling)."""
    weight = torch.zeros(features.shape[1], dtype=features.dtype, requires_grad=True)
    bias = torch.zeros(1, dtype=features.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(features @ weight + bias, targets)
        loss = loss + weight_decay / 2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def domain_classifier_auc(reference: Tensor, recent: Tensor, folds: int = 5, seed: int = 0,
                          weight_decay: float = 1e-2) -> float:
    """Mean held-out ROC AUC of a logistic regression telling `recent` rows [M,D] from `reference` rows [N,D].

    Each window is split into `folds` equal parts by a seeded permutation (stratified: every fold holds both
    windows in proportion); each fold is scored by a model fitted to the others, on features standardised with
    the fitted part's statistics."""
    features = torch.cat([reference, recent]).double().cpu()
    targets = torch.cat([torch.zeros(len(reference)), torch.ones(len(recent))]).double()
    generator = torch.Generator().manual_seed(seed)
    fold_of = torch.empty(len(features), dtype=torch.int64)
    for start, count in ((0, len(reference)), (len(reference), len(recent))):
        fold_of[start + torch.randperm(count, generator=generator)] = torch.arange(count) % folds
    aucs = []
    for fold in range(folds):
        held = fold_of == fold
        fitted = features[~held]
        mean, std = fitted.mean(0), fitted.std(0).clamp_min(1e-8)
        weight, bias = fit_logistic((fitted - mean) / std, targets[~held], weight_decay)
        aucs.append(roc_auc((features[held] - mean) / std @ weight + bias, targets[held]))
    return sum(aucs) / len(aucs)


class DriftMonitor:
    """The two windows of raw images and the drift between them.

    Args:
        window: Records per window.
        shape: One image's (channels, height, width).
        folds: Cross-validation folds of the domain classifier.
        threshold: An AUC above it is logged as a warning.
        seed: The folds' permutation.
    """

    def __init__(self, window: int, shape: tuple[int, int, int], folds: int = 5, threshold: float = 0.55,
                 seed: int = 0) -> None:
        self.window, self.folds, self.threshold, self.seed = window, folds, threshold, seed
        self.reference = torch.zeros((window, *shape), dtype=torch.uint8)
        self.recent = torch.zeros((window, *shape), dtype=torch.uint8)
        self.reference_fill = 0  # records in the reference so far (it fills once, then stays)
        self.recent_seen = 0  # records that arrived after the reference was full; the ring's next slot is this % window

    @property
    def ready(self) -> bool:
        return self.recent_seen >= self.window

    def observe(self, images: Tensor, extents: Tensor | None = None) -> None:
        """Takes a batch of arriving uint8 images [B,C,H,W]: the reference until it is full, then the ring.

        A full-resolution batch (each image padded on a larger canvas, its height and width in `extents`) is
        resized image by image to the windows' side first, so the windows hold whole images of one shape."""
        images = images.cpu() if extents is None else _whole_images(images.cpu(), extents.cpu(), self.recent.shape[-1])
        take = min(self.window - self.reference_fill, len(images))
        if take:
            self.reference[self.reference_fill:self.reference_fill + take] = images[:take]
            self.reference_fill += take
            images = images[take:]
        kept = images[-self.window:]  # of a batch larger than the ring, only its newest records stay
        start = self.recent_seen + len(images) - len(kept)
        self.recent[(start + torch.arange(len(kept))) % self.window] = kept
        self.recent_seen += len(images)

    @torch.no_grad()
    def measure(self, encoder: nn.Module, mean: list[float], std: list[float], device: torch.device,
                autocast: bool = False) -> float | None:
        """The drift AUC of the two windows embedded by `encoder`; None until both are full."""
        if not self.ready:
            return None
        started = time.perf_counter()
        reference = embed(encoder, self.reference, mean, std, device, autocast=autocast)
        recent = embed(encoder, self.recent, mean, std, device, autocast=autocast)
        auc = domain_classifier_auc(reference, recent, self.folds, self.seed)
        alarm = auc > self.threshold
        log.log(logging.WARNING if alarm else logging.INFO,
                "embedding drift AUC %.3f%s (the run's first %d records vs the latest %d; %.2f s)", auc,
                f", above drift.threshold {self.threshold}" if alarm else "", self.window, self.window,
                time.perf_counter() - started)
        return auc

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference.clone(), "reference_fill": self.reference_fill,
                "recent": self.recent.clone(), "recent_seen": self.recent_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint's windows; windows of another size or image shape (drift.window or data.size changed) are
        not comparable with what arrives now, so they start over."""
        if state["reference"].shape != self.reference.shape:
            log.info("drift windows of shape %s in the checkpoint, %s configured: they fill again from here",
                     tuple(state["reference"].shape), tuple(self.reference.shape))
            self.reference_fill = self.recent_seen = 0
            return
        self.reference.copy_(state["reference"])
        self.recent.copy_(state["recent"])
        self.reference_fill, self.recent_seen = int(state["reference_fill"]), int(state["recent_seen"])


def _whole_images(images: Tensor, extents: Tensor, side: int) -> Tensor:
    """Each padded image's own extent, resized (bilinear, antialiased) to side x side, as uint8."""
    out = [F.interpolate(image[None, :, :int(h), :int(w)].float(), size=(side, side), mode="bilinear",
                         antialias=True, align_corners=False)
           for image, (h, w) in zip(images, extents.tolist(), strict=True)]
    return torch.cat(out).round().clamp(0, 255).to(torch.uint8)
