"""Stream orders as data: the order in which a labelled set is written into a lake, so that a follow-mode pass
delivers it like a real stream that was never shuffled (SCALE, Yu et al. 2023, benchmarks such orders).

Labels decide the order only; training never reads them. Orders:
* `iid`: a random permutation (the shuffled reference).
* `class-sequential`: every image of one class, then the next (classes in a random order).
* `correlated-runs`: runs of `run_length` images of one class, the runs in a random order (one camera or one
  category at a time).
* `blurred`: class-sequential with blurred boundaries: each image's place is its class's rank plus a uniform
  offset in [0, 1.5), so the last third of each class's span mixes with the next class.
* `imbalanced`: class-sequential with imbalanced lengths: the k-th class (in the random order) keeps
  0.1 ** (k / (classes - 1)) of its images, from all of the first to a tenth of the last.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from PIL import Image

Order = Literal["iid", "class-sequential", "correlated-runs", "blurred", "imbalanced"]
ORDERS: tuple[str, ...] = get_args(Order)


def stream_order(labels: np.ndarray, order: str, run_length: int = 200, seed: int = 0) -> np.ndarray:
    """Indices into `labels` in stream order (a subset for `imbalanced`)."""
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; valid: {', '.join(ORDERS)}")
    if run_length < 1:
        raise ValueError(f"run_length must be at least 1, got {run_length}")
    rng = np.random.default_rng(seed)
    if order == "iid":
        return rng.permutation(len(labels))
    classes = rng.permutation(np.unique(labels))
    pools = [rng.permutation(np.flatnonzero(labels == label)) for label in classes]
    if order == "class-sequential":
        return np.concatenate(pools)
    if order == "imbalanced":
        shares = 0.1 ** (np.arange(len(pools)) / max(len(pools) - 1, 1))
        return np.concatenate([pool[:max(1, round(len(pool) * share))] for pool, share in zip(pools, shares, strict=True)])
    if order == "blurred":
        index = np.concatenate(pools)
        rank = np.concatenate([np.full(len(pool), k, dtype=float) for k, pool in enumerate(pools)])
        return index[np.argsort(rank + rng.uniform(0, 1.5, len(index)), kind="stable")]
    runs = [pool[start:start + run_length] for pool in pools for start in range(0, len(pool), run_length)]
    return np.concatenate([runs[i] for i in rng.permutation(len(runs))])


def read_labelled_lake(lake: Path) -> tuple[np.ndarray, np.ndarray]:
    """Greyscale images [N, H, W] (uint8) and labels of a lake whose records hold `png` + `json` with "label"."""
    images, labels = [], []
    for shard in sorted(Path(lake).glob("*.tar")):
        with tarfile.open(shard) as tar:
            fields: dict[str, dict[str, bytes]] = {}
            for member in tar:
                key, _, extension = member.name.partition(".")
                handle = tar.extractfile(member)
                if handle is not None:
                    fields.setdefault(key, {})[extension] = handle.read()
        for record in fields.values():
            if "png" in record and "json" in record:
                images.append(np.asarray(Image.open(io.BytesIO(record["png"])).convert("L")))
                labels.append(int(json.loads(record["json"])["label"]))
    if not images:
        raise ValueError(f"no labelled png records in {lake}")
    return np.stack(images), np.asarray(labels)
