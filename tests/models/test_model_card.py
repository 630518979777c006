"""The model card (README.md) in a published version: what it says, and that its load snippets run as written."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from streamssl.models import load_encoder
from streamssl.models.encoder_io import Manifest, save_encoder
from streamssl.models.forecaster import build_trunk
from streamssl.models.model_card import CARD_FILE, write_model_card
from streamssl.models.onnx_export import onnx_skipped
from streamssl.pipeline.images import Trainer
from tests.conftest import tiny_config

# a small kNN monitor, so that the card has metrics to describe
MONITOR = ["eval.dataset=fashion-mnist", "eval.bank_size=500", "eval.test_size=100", "eval.k=20"]


def snippets(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.DOTALL)


def run_snippet(code: str, where: Path) -> dict:
    """Runs `code` as a reader of the card would: from the folder that holds the version folder."""
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(where)
    try:
        exec(compile(code, CARD_FILE, "exec"), namespace)
    finally:
        os.chdir(cwd)
    return namespace


def test_a_published_version_has_a_card_whose_python_and_onnxruntime_snippets_run(
        tmp_path: Path, small_lake: Path, one_thread: None) -> None:
    run_dir = tmp_path / "run"
    Trainer(tiny_config(run_dir, small_lake, "train.max_steps=4", "checkpoint.publish_every=0", "publish.onnx=true",
                        *MONITOR)).run()
    folder = run_dir / "published" / "v000001"
    card = (folder / CARD_FILE).read_text()
    manifest = load_encoder(folder).manifest  # README.md's sha256 is in `files`, and it matches
    assert set(manifest["files"]) == {"encoder.safetensors", "encoder.onnx", CARD_FILE}

    assert card.startswith("# moco encoder v000001\n")
    assert "`convnet` (in_channels=1)" in card and manifest["backbone_options"] == {"in_channels": 1}
    assert f"Trained for 4 steps on {manifest['samples_seen']} samples" in card
    first, last = manifest["lineage"]["first_position"], manifest["lineage"]["last_position"]
    assert first["sample_index"] != last["sample_index"] and json.dumps(first, sort_keys=True) in card
    assert f"`knn_top1`: {manifest['metrics']['knn_top1']:.4g}" in card
    assert "k=20, T=0.1" in card and "a bank of 500 labelled training images and 100 test images" in card
    assert manifest["lineage"]["config_digest"] in card and manifest["files"]["encoder.onnx"] in card
    assert "one input `images` (float32, shape `['batch', 1, 28, 28]`" in card

    python, onnx = snippets(card)
    assert "load_encoder" in python and "onnxruntime" in onnx
    embedded = run_snippet(python, folder.parent)["embeddings"]
    assert isinstance(embedded, torch.Tensor) and embedded.shape == (8, 256) and bool(torch.isfinite(embedded).all())
    embedded = run_snippet(onnx, folder.parent)["embeddings"]
    assert isinstance(embedded, np.ndarray) and embedded.shape == (8, 256) and bool(np.isfinite(embedded).all())


def test_a_series_card_without_onnx_says_why_and_its_python_snippet_runs(tmp_path: Path) -> None:
    folder = tmp_path / "v000002"
    manifest = Manifest(backbone="forecaster-cnn", input={"channels": 2, "lag": 12, "mean": [0.0, 0.0],
                                                          "std": [1.0, 1.0]}, embedding_dim=16, method="forecast",
                        version=2, metrics={"nrmse": 0.41, "nrmse_definition": "RMSE / std of the test targets"},
                        extra={"series": "electricity"})
    save_encoder(folder, build_trunk("cnn", 2, 12, 16), manifest,
                 [onnx_skipped("not exported: publish.onnx is false"), write_model_card])
    card = (folder / CARD_FILE).read_text()
    assert "No ONNX export in this version (not exported: publish.onnx is false)." in card
    assert "the series `electricity`" in card and "nRMSE: RMSE / std of the test targets." in card
    (python,) = snippets(card)
    assert run_snippet(python, tmp_path)["embeddings"].shape == (8, 16)


@pytest.mark.parametrize("metrics", [{}, {"rolling_nrmse": 0.5}])
def test_a_card_without_lineage_or_a_known_input_still_renders(tmp_path: Path, metrics: dict) -> None:
    # what save_encoder writes for a module load_encoder does not know, outside any run
    manifest = Manifest(backbone="linear", input={"features": 1}, embedding_dim=1, metrics=metrics)
    save_encoder(tmp_path, torch.nn.Linear(1, 1), manifest, [write_model_card])
    card = (tmp_path / CARD_FILE).read_text()
    assert "- Stream range: not recorded." in card and "# the input it takes: see manifest.json's input" in card
