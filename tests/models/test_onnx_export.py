"""encoder.onnx beside a published encoder: onnxruntime gives what `load_encoder` gives, at any batch size, from the
same raw input; an encoder the exporter cannot handle is published without it, its manifest saying why."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import Tensor, nn

from streamssl.models import load_encoder
from streamssl.models.backbones import build_backbone
from streamssl.models.encoder_io import Manifest, save_encoder
from streamssl.models.forecaster import build_trunk
from streamssl.models.onnx_export import ONNX_FILE, OPSET, export_onnx
from streamssl.models.series_backbones import PooledSeriesEncoder, build_series_encoder
from streamssl.streams.fashion_mnist import load_fashion_mnist

IMAGE_INPUT = {"channels": 1, "height": 28, "width": 28, "mean": [0.286], "std": [0.353]}


def fashion_mnist(count: int, offset: int = 0) -> Tensor:
    images, _ = load_fashion_mnist("test")
    return torch.from_numpy(images[offset:offset + count]).float().div(255).unsqueeze(1)


def onnx_vs_torch(folder: Path, batch: Tensor) -> float:
    """max |onnxruntime − load_encoder| on `batch`, each fed the same raw input."""
    session = onnxruntime.InferenceSession(str(folder / ONNX_FILE), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
    with torch.no_grad():
        expected = load_encoder(folder)(batch)
    assert got.shape == tuple(expected.shape)
    return float(np.abs(got - expected.numpy()).max())


def test_the_convnet_in_onnxruntime_matches_the_torch_encoder_on_fashion_mnist(tmp_path: Path, one_thread: None) -> None:
    backbone, dim = build_backbone("convnet", 1, bn_splits=4)  # split BN, as MoCo trains it
    with torch.no_grad():  # BN running statistics of real images, not the initial 0 / 1
        backbone.train()(((fashion_mnist(256, offset=1000)) - 0.286) / 0.353)
    written = save_encoder(tmp_path, backbone, Manifest(backbone="convnet", input=IMAGE_INPUT, embedding_dim=dim),
                           [export_onnx])

    assert written["onnx"]["opset"] == OPSET and written["onnx_unavailable"] == ""
    assert written["onnx"]["input"] == {"name": "images", "shape": ["batch", 1, 28, 28], "dtype": "float32",
                                        "values": "float pixels in [0, 1], normalised inside with input.mean/std"}
    assert written["files"][ONNX_FILE] == json.loads((tmp_path / "manifest.json").read_text())["files"][ONNX_FILE]
    model = onnx.load(str(tmp_path / ONNX_FILE))
    assert [entry.version for entry in model.opset_import if entry.domain == ""] == [OPSET]
    assert [dim.dim_param or dim.dim_value for dim in model.graph.input[0].type.tensor_type.shape.dim] == ["batch", 1, 28, 28]
    for batch_size in (1, 7):  # neither is the export's example batch (2) or its own check's (3)
        difference = onnx_vs_torch(tmp_path, fashion_mnist(batch_size))
        print(f"convnet, batch {batch_size}: max abs diff {difference:.3g}")
        assert difference < 1e-4
    load_encoder(tmp_path)  # the manifest lists encoder.onnx's sha256 and it matches


@pytest.mark.parametrize("kind", ["series-conv", "forecaster-cnn"])
def test_a_series_encoder_in_onnxruntime_matches_the_torch_encoder(tmp_path: Path, one_thread: None,
                                                                     kind: str) -> None:
    torch.manual_seed(0)
    if kind == "series-conv":  # CPC's, from a streaming run: each series normalised by the consumer
        backbone: nn.Module = PooledSeriesEncoder(build_series_encoder("conv", 1)[0])
        spec, length = {"channels": 1, "window": 128, "series": {"a": {"mean": 3.0, "std": 2.0}}}, 128
    else:  # the offline forecaster: the z-score is in the manifest, and inside the graph
        backbone, spec, length = build_trunk("cnn", 2, 12, 64), {"channels": 2, "lag": 12, "mean": [5.0, 0.0],
                                                                 "std": [2.0, 0.5]}, 12
    written = save_encoder(tmp_path, backbone, Manifest(backbone=kind, input=spec, embedding_dim=64), [export_onnx])
    assert written["onnx"]["input"]["shape"] == ["batch", spec["channels"], length]
    time = torch.arange(length, dtype=torch.float32)
    for batch_size in (1, 7):  # noisy sines of different phases, in the units the encoder takes
        phases = torch.linspace(0, math.pi, batch_size).view(-1, 1, 1)
        windows = torch.sin(time / 6 + phases).repeat(1, spec["channels"], 1) + 0.1 * torch.randn(
            batch_size, spec["channels"], length)
        difference = onnx_vs_torch(tmp_path, windows)
        print(f"{kind}, batch {batch_size}: max abs diff {difference:.3g}")
        assert difference < 1e-4


class BranchOnData(nn.Module):
    """A user's backbone the exporter cannot capture: which branch runs depends on the values of the input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        features = self.conv(x).mean((2, 3))
        return features if float(features.sum()) > 0 else -features


def test_an_encoder_the_exporter_cannot_handle_is_published_without_onnx_and_the_manifest_says_why(
        tmp_path: Path, one_thread: None, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="streamssl.models.onnx_export"):
        written = save_encoder(tmp_path, BranchOnData(), Manifest(backbone="branch-on-data", input=IMAGE_INPUT,
                                                                   embedding_dim=4), [export_onnx])
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["onnx"] is None and on_disk == written
    assert on_disk["onnx_unavailable"].startswith("export failed: ")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["encoder.safetensors", "manifest.json"]
    assert list(on_disk["files"]) == ["encoder.safetensors"]
    assert f"version published without {ONNX_FILE} (export failed: " in caplog.text
