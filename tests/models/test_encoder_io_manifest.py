"""The one manifest type: its manifest.json form, job-specific extras, and folders published with the old names."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

from streamssl.models import EncoderLoadError, load_encoder
from streamssl.models.encoder_io import Manifest, save_encoder
from streamssl.models.forecaster import build_trunk

SERIES_INPUT = {"channels": 2, "channel_names": ["series", "imf-1"], "lag": 6, "window": 32, "horizon": 1,
                "mean": [5.0, 0.1], "std": [2.0, 0.5]}


def _trunk() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_trunk("cnn", 2, 6, 16).eval()


def test_a_manifest_round_trips_through_its_json_form_with_its_extras_beside_the_fields(tmp_path: Path) -> None:
    manifest = Manifest(backbone="forecaster-cnn", input=SERIES_INPUT, embedding_dim=16, method="forecast", step=40,
                        metrics={"nrmse": 0.31}, extra={"mode": "combined", "best_step": 30, "groups": {"aux": [1]}})
    written = manifest.to_dict()
    assert written["mode"] == "combined" and written["best_step"] == 30 and "extra" not in written
    assert Manifest.from_dict(json.loads(json.dumps(written))) == manifest
    saved = save_encoder(tmp_path, _trunk(), manifest)
    assert load_encoder(tmp_path).manifest == saved == json.loads((tmp_path / "manifest.json").read_text())
    assert Manifest.from_dict(saved).files == {"encoder.safetensors": saved["files"]["encoder.safetensors"]}


@pytest.mark.parametrize("name", ["metrics", "step", "eval", "feature_dim"])
def test_an_extra_may_not_shadow_a_field_or_an_old_name(name: str) -> None:
    with pytest.raises(ValueError, match="must not repeat"):
        Manifest(backbone="convnet", input={}, embedding_dim=8, extra={name: 1})


def test_a_folder_published_with_the_old_names_still_loads(tmp_path: Path) -> None:
    # What the offline forecaster published before one Manifest type: "feature_dim" and "eval".
    trunk = _trunk()
    weights = save_safetensors({name: value.contiguous() for name, value in trunk.state_dict().items()})
    (tmp_path / "encoder.safetensors").write_bytes(weights)
    old = {"version": 1, "step": 40, "best_step": 30, "samples_seen": 2560, "method": "forecast", "mode": "combined",
           "backbone": "forecaster-cnn", "feature_dim": 16, "series": "electricity", "input": SERIES_INPUT,
           "targets": {"names": ["series"], "mean": [5.0], "std": [2.0]}, "groups": None, "decomposition": None,
           "eval": {"nrmse": 0.31, "test_points": 800}, "created_at": "2026-01-01T00:00:00Z",
           "files": {"encoder.safetensors": hashlib.sha256(weights).hexdigest()}}
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    encoder = load_encoder(tmp_path)
    windows = torch.randn(3, 2, 6)
    with torch.no_grad():
        expected = trunk((windows - torch.tensor([5.0, 0.1]).view(1, -1, 1)) / torch.tensor([2.0, 0.5]).view(1, -1, 1))
        torch.testing.assert_close(encoder(windows), expected)
    assert encoder.manifest["embedding_dim"] == 16 and encoder.manifest["metrics"] == old["eval"]
    assert "feature_dim" not in encoder.manifest and "eval" not in encoder.manifest
    assert {name: encoder.manifest[name] for name in ("best_step", "series", "targets", "mode")} == {
        "best_step": 30, "series": "electricity", "targets": old["targets"], "mode": "combined"}


def test_a_manifest_without_an_embedding_size_is_refused(tmp_path: Path) -> None:
    written = save_encoder(tmp_path, _trunk(), Manifest(backbone="forecaster-cnn", input=SERIES_INPUT, embedding_dim=16))
    del written["embedding_dim"]
    (tmp_path / "manifest.json").write_text(json.dumps(written))
    with pytest.raises(EncoderLoadError, match="invalid manifest"):
        load_encoder(tmp_path)
