"""Publishing fills in what only the publisher knows (version, time, hashes) and writes today's names only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from streamssl.models import load_encoder
from streamssl.models.encoder_io import Manifest
from streamssl.models.forecaster import build_trunk
from streamssl.pipeline.publishing import OlderThanLatest, Publisher

INPUT = {"channels": 1, "lag": 6, "window": 32, "mean": [0.0], "std": [1.0]}


def test_versions_count_up_and_latest_follows(tmp_path: Path) -> None:
    publisher, trunk = Publisher(tmp_path), build_trunk("cnn", 1, 6, 8)
    assert publisher.latest_step() == -1
    for step in (5, 10):
        publisher.publish(trunk, Manifest(backbone="forecaster-cnn", input=INPUT, embedding_dim=8, step=step))
    manifest = load_encoder(tmp_path / "latest").manifest
    assert (manifest["version"], manifest["step"], publisher.latest_step(), publisher.latest_version()) == (2, 10, 10, 2)
    assert manifest["created_at"].endswith("Z")


def test_a_manifest_read_with_the_old_names_is_published_with_todays(tmp_path: Path) -> None:
    # what the forecast command wrote before the one Manifest: "feature_dim" and "eval"
    old = {"step": 3, "method": "forecast", "backbone": "forecaster-cnn", "feature_dim": 8, "input": INPUT,
           "eval": {"nrmse": 0.4}, "best_step": 2}
    _, folder = Publisher(tmp_path).publish(build_trunk("cnn", 1, 6, 8), Manifest.from_dict(old))
    written = json.loads((folder / "manifest.json").read_text())
    assert (written["embedding_dim"], written["metrics"], written["best_step"]) == (8, {"nrmse": 0.4}, 2)
    assert "feature_dim" not in written and "eval" not in written
    assert load_encoder(folder)(torch.randn(2, 1, 6)).shape == (2, 8)


def test_an_older_lineage_is_refused_and_latest_keeps_the_newer_one(tmp_path: Path) -> None:
    publisher, trunk = Publisher(tmp_path), build_trunk("cnn", 1, 6, 8)
    publisher.publish(trunk, Manifest(backbone="forecaster-cnn", input=INPUT, embedding_dim=8, step=12))
    with pytest.raises(OlderThanLatest, match="step 3 is below step 12"):
        publisher.publish(trunk, Manifest(backbone="forecaster-cnn", input=INPUT, embedding_dim=8, step=3))
    assert (publisher.latest_version(), publisher.latest_step()) == (1, 12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "latest", "v000001"]
    publisher.publish(trunk, Manifest(backbone="forecaster-cnn", input=INPUT, embedding_dim=8, step=12))  # same step: ok
    assert publisher.latest_version() == 2
