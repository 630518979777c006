"""`streamssl lake --order …`: each order's lake, read back in name and tar order, has the order it claims."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from streamssl.pipeline.cli import main
from streamssl.streams.orders import read_labelled_lake, stream_order


def lake_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[np.ndarray, dict]:
    out = tmp_path / "lake"
    assert main(["lake", "--out", str(out), "--limit", "1200", "--shard-size", "100", *args]) == 0
    report = json.loads(capsys.readouterr().out)
    _, labels = read_labelled_lake(out)
    return labels, report


def changes(labels: np.ndarray) -> int:
    return int((labels[1:] != labels[:-1]).sum())


def test_iid_and_class_sequential(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels, report = lake_labels(tmp_path / "iid", capsys, "--order", "iid")
    assert report["samples"] == 1200 and changes(labels) > 0.8 * 1200
    labels, _ = lake_labels(tmp_path / "seq", capsys, "--order", "class-sequential")
    assert changes(labels) == 9 and len(np.unique(labels)) == 10


def test_correlated_runs_blurred_and_imbalanced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels, _ = lake_labels(tmp_path / "runs", capsys, "--order", "correlated-runs", "--run-length", "30")
    boundaries = np.flatnonzero(labels[1:] != labels[:-1])
    lengths = np.diff(np.concatenate([[-1], boundaries, [len(labels) - 1]]))
    assert lengths.max() <= 60 and np.median(lengths) >= 15 and len(lengths) > 1200 / 60  # runs of ~30, merged rarely

    labels, _ = lake_labels(tmp_path / "blurred", capsys, "--order", "blurred")
    assert 9 < changes(labels) < 0.5 * 1200  # mixed only near the boundaries
    mean_place = {label: np.flatnonzero(labels == label).mean() for label in np.unique(labels)}
    rank = {label: r for r, label in enumerate(sorted(mean_place, key=mean_place.__getitem__))}
    assert np.corrcoef(np.arange(len(labels)), [rank[label] for label in labels])[0, 1] > 0.95  # still in class order

    labels, report = lake_labels(tmp_path / "imbalanced", capsys, "--order", "imbalanced")
    counts = [int((labels == label).sum()) for label in dict.fromkeys(labels.tolist())]  # in stream order
    assert changes(labels) == 9 and counts == sorted(counts, reverse=True) and counts[-1] < 0.2 * counts[0]
    assert report["samples"] == len(labels) < 1200


def test_orders_are_permutations_and_seeded() -> None:
    labels = np.repeat(np.arange(5), 40)
    for order in ("iid", "class-sequential", "correlated-runs", "blurred"):
        index = stream_order(labels, order, run_length=7, seed=1)
        assert sorted(index.tolist()) == list(range(200)), order
        assert np.array_equal(index, stream_order(labels, order, run_length=7, seed=1))
    with pytest.raises(ValueError, match="unknown order"):
        stream_order(labels, "sorted")
