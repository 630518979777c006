"""What `streamssl report` computes from a run's encoder: the retrieval grid's neighbours and the cluster sizes.

The retrieval grid embeds the kNN monitor's own sets (pipeline/loading/sources.py `knn_sets`: the training bank
and the held-out test subset) with the published encoder, loaded as a consumer loads it (`load_encoder`). Cluster
sizes come from the latest checkpoint: DeepCluster keeps its last clustering's sizes in a buffer; SwAV has no such
count, so the checkpoint's backbone, head and prototypes assign the bank images to prototypes (what its codes'
argmax would be, without Sinkhorn's equal-partition constraint). Each returns the data or a sentence saying why
there is none.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from streamssl.models import EncoderLoadError, build_backbone, build_method, load_encoder
from streamssl.monitoring.report import Clusters
from streamssl.monitoring.retrieval_grid import Retrieval, nearest, one_per_class
from streamssl.pipeline.augment import normalise
from streamssl.pipeline.checkpointing import Checkpointer, NoReadableCheckpoint
from streamssl.pipeline.config import Config
from streamssl.pipeline.evaluation.knn import embed
from streamssl.pipeline.rundir import RunDirError
from streamssl.streams.files import RunPaths

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
EvalSets = tuple[Tensor, Tensor, Tensor, Tensor]  # bank images, bank labels, test images, test labels
CPU = torch.device("cpu")


def retrieval(paths: RunPaths, sets: EvalSets, queries: int, neighbours: int) -> Retrieval | str:
    """`queries` test images (one per class while classes last) and their `neighbours` nearest bank images."""
    latest = paths.published / "latest"
    if not latest.exists():
        return f"nothing is published yet ({latest} does not exist)"
    try:
        encoder = load_encoder(latest)
    except EncoderLoadError as err:
        return f"the published encoder does not load ({err})"
    bank, bank_labels, test, test_labels = sets
    spec, manifest = encoder.manifest.get("input", {}), encoder.manifest
    if [spec.get("channels"), spec.get("height"), spec.get("width")] != list(bank.shape[1:]):
        return (f"the published encoder takes {spec.get('channels')}x{spec.get('height')}x{spec.get('width')} "
                f"images, the eval set has {'x'.join(map(str, bank.shape[1:]))}")
    chosen = torch.from_numpy(one_per_class(test_labels.numpy(), queries))
    # A published encoder normalises its own input: plain [0, 1] pixels, as `streamssl eval` feeds it.
    bank_z = embed(encoder, bank, [0.0], [1.0], CPU).numpy()
    query_z = embed(encoder, test[chosen], [0.0], [1.0], CPU).numpy()
    index, similarity = nearest(query_z, bank_z, neighbours)
    return Retrieval(test[chosen].numpy(), test_labels[chosen].numpy(), bank.numpy()[index],
                     bank_labels.numpy()[index], similarity, FASHION_MNIST_CLASSES,
                     caption=f"published v{manifest.get('version', 0):06d} (step {manifest.get('step')}); queries from "
                             f"{len(test)} Fashion-MNIST test images, neighbours among {len(bank)} training images")


def _latest_checkpoint(paths: RunPaths) -> tuple[dict[str, Any], Path] | str:
    try:
        found = Checkpointer(paths.checkpoints).load_latest()
    except (NoReadableCheckpoint, RunDirError) as err:
        return f"no checkpoint loads ({err})"
    return found if found is not None else f"no checkpoint in {paths.checkpoints}"


def _state(ckpt: dict[str, Any], name: str) -> Tensor:
    """A method buffer by its own name, with or without the multi-task wrapper's `inner.` in front."""
    state = ckpt["method"]
    return state[name] if name in state else state[f"inner.{name}"]


def cluster_sizes(paths: RunPaths, cfg: Config, sets: EvalSets | None) -> Clusters | str:
    if cfg.method not in ("deepcluster", "swav"):
        return f"the method {cfg.method} has no clusters (only deepcluster and swav do)"
    found = _latest_checkpoint(paths)
    if isinstance(found, str):
        return found
    ckpt, path = found
    if cfg.method == "deepcluster":
        if int(_state(ckpt, "clusterings")) == 0:
            return (f"DeepCluster has not clustered yet at step {ckpt['step']} (its clusterings are at "
                    f"shares of the horizon, see deepcluster.*)")
        sizes = _state(ckpt, "cluster_sizes").numpy()
        return Clusters(sizes, f"DeepCluster: k-means of {int(sizes.sum()):,} buffered features at its last clustering "
                               f"(step {int(_state(ckpt, 'last_clustering_step'))})")
    if sets is None:
        return "SwAV's prototype assignments are counted on the eval set, and the run has none (eval.dataset=none)"
    return Clusters(_prototype_assignments(cfg, ckpt, sets[0]),
                    f"SwAV: nearest prototype of {len(sets[0]):,} eval-bank images ({path.name})")


@torch.no_grad()
def _prototype_assignments(cfg: Config, ckpt: dict[str, Any], images: Tensor) -> np.ndarray:
    """How many of `images` score highest against each of the checkpoint's SwAV prototypes."""
    backbone, feature_dim = build_backbone(cfg.model.backbone, cfg.data.channels, bn_splits=cfg.model.bn_splits)
    method = build_method(cfg.method, backbone, feature_dim, cfg.method_options(), dataclasses.asdict(cfg.aux))
    method.load_state_dict(ckpt["method"])
    swav: Any = getattr(method, "inner", method).eval()
    prototypes = F.normalize(swav.prototypes.weight, dim=1)
    counts = torch.zeros(len(prototypes), dtype=torch.long)
    for start in range(0, len(images), 1024):
        batch = normalise(images[start:start + 1024], cfg.data.mean, cfg.data.std)
        z = F.normalize(swav.head(swav.backbone(batch)), dim=1)
        counts += torch.bincount((z @ prototypes.T).argmax(dim=1), minlength=len(prototypes))
    return counts.numpy()
