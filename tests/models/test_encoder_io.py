"""Published encoders: save/load round trip, integrity checks, and a loader free of training code."""

import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from streamssl.models import EncoderLoadError, PublishedEncoder, build_backbone, load_encoder
from streamssl.models.encoder_io import Manifest, build_published, save_encoder
from tests.test_architecture import imported_modules

MODELS = Path(__file__).resolve().parents[2] / "models"


def _manifest(backbone: str = "convnet", channels: int = 1) -> Manifest:
    return Manifest(
        version=3, step=1200, samples_seen=76800, method="moco", backbone=backbone, embedding_dim=256,
        input={"channels": channels, "height": 28, "width": 28, "mean": [0.2860] * channels, "std": [0.3530] * channels},
        metrics={"knn_top1": 0.81}, created_at="2025-01-01T00:00:00Z",
    )


def _trained_backbone(bn_splits: int = 1) -> torch.nn.Module:
    """A convnet whose BN running stats have moved away from their defaults."""
    torch.manual_seed(0)
    backbone, _ = build_backbone("convnet", 1, bn_splits=bn_splits)
    for _ in range(2):
        backbone(torch.rand(8, 1, 28, 28) * 3)
    return backbone.eval()


def test_round_trip_gives_identical_embeddings(tmp_path: Path) -> None:
    backbone, manifest = _trained_backbone(), _manifest()
    written = save_encoder(tmp_path / "v000003", backbone, manifest)

    encoder = load_encoder(tmp_path / "v000003")

    images = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(encoder(images), PublishedEncoder(backbone, manifest.to_dict())(images))
    assert not encoder.training
    assert encoder.manifest == written == json.loads((tmp_path / "v000003" / "manifest.json").read_text())
    weights = (tmp_path / "v000003" / "encoder.safetensors").read_bytes()
    assert written["files"] == {"encoder.safetensors": hashlib.sha256(weights).hexdigest()}
    assert {k: v for k, v in written.items() if k != "files"} == {k: v for k, v in manifest.to_dict().items() if k != "files"}


def test_encoder_normalises_its_input_with_the_manifest_statistics(tmp_path: Path) -> None:
    backbone = _trained_backbone()
    save_encoder(tmp_path, backbone, _manifest())
    images = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(load_encoder(tmp_path)(images), backbone((images - 0.2860) / 0.3530))
        with pytest.raises(TypeError, match="float images"):
            load_encoder(tmp_path)((images * 255).to(torch.uint8))


def test_loads_through_a_latest_symlink(tmp_path: Path) -> None:
    save_encoder(tmp_path / "v000001", _trained_backbone(), _manifest())
    (tmp_path / "latest").symlink_to("v000001")
    assert load_encoder(str(tmp_path / "latest")).manifest["step"] == 1200


def test_split_bn_and_channels_last_backbone_loads_into_a_plain_one(tmp_path: Path) -> None:
    backbone = _trained_backbone(bn_splits=2).to(memory_format=torch.channels_last)
    save_encoder(tmp_path, backbone, _manifest())
    images = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(load_encoder(tmp_path)(images), PublishedEncoder(backbone, _manifest().to_dict())(images))


def test_a_tampered_byte_is_refused(tmp_path: Path) -> None:
    save_encoder(tmp_path, _trained_backbone(), _manifest())
    weights = tmp_path / "encoder.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(EncoderLoadError, match=r"encoder\.safetensors: sha256 mismatch") as error:
        load_encoder(tmp_path)
    assert "\n" not in str(error.value)


def test_missing_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(EncoderLoadError, match=r"manifest\.json"):
        load_encoder(tmp_path)
    save_encoder(tmp_path, _trained_backbone(), _manifest())
    (tmp_path / "encoder.safetensors").unlink()
    with pytest.raises(EncoderLoadError, match=r"encoder\.safetensors"):
        load_encoder(tmp_path)


def test_weights_that_do_not_fit_the_named_backbone_are_refused(tmp_path: Path) -> None:
    save_encoder(tmp_path, _trained_backbone(), _manifest(channels=3))  # 1-channel weights, 3-channel spec
    with pytest.raises(EncoderLoadError, match="does not fit"):
        load_encoder(tmp_path)


def test_an_unknown_backbone_in_the_manifest_is_refused(tmp_path: Path) -> None:
    save_encoder(tmp_path, _trained_backbone(), replace(_manifest(), backbone="vit"))
    with pytest.raises(EncoderLoadError, match="invalid manifest"):
        load_encoder(tmp_path)


def test_encoder_io_imports_no_training_code() -> None:
    modules = set().union(*(imported_modules(MODELS / name)
                            for name in ("encoder_io.py", "encoder_checks.py", "encoder_signing.py",
                                         "encoder_folder.py", "published.py")))
    third_party = {m for m in modules if m.split(".")[0] not in sys.stdlib_module_names}
    assert {m.split(".")[0] for m in third_party} <= {"torch", "safetensors", "streamssl"}
    # only the architectures a published encoder can name: image backbones (and a user's factory), series encoders,
    # forecaster trunks
    # (and the loader's own checks, confined reads, wrappers and signing, the artifact type (a type alias and a
    # digest helper), and the leaf module for atomic writes)
    assert {m for m in third_party if m.startswith("streamssl")} == {
        "streamssl.models.artifacts", "streamssl.models.backbones", "streamssl.models.user_backbones",
        "streamssl.models.series_backbones",
        "streamssl.models.forecaster", "streamssl.models.encoder_checks", "streamssl.models.encoder_signing",
        "streamssl.models.encoder_folder",
        "streamssl.models.published", "streamssl.streams.files"}


@pytest.mark.parametrize("backbone", ["convnet", "resnet18", "series-conv", "forecaster-cnn", "forecaster-lstm"])
def test_every_loadable_backbone_keeps_all_its_tensors_in_its_state_dict(backbone: str) -> None:
    # load_encoder fills uninitialised storage from the weights file, which holds the state_dict alone:
    # a non-persistent buffer would be left as garbage.
    manifest = Manifest(backbone=backbone, embedding_dim={"convnet": 256, "resnet18": 512}.get(backbone, 16),
                        input={"channels": 2, "lag": 6, "mean": [0.0, 0.0], "std": [1.0, 1.0]})
    with torch.device("meta"):
        module, _ = build_published(manifest)
    tensors = {name for name, _ in [*module.named_parameters(), *module.named_buffers()]}
    assert tensors == set(module.state_dict())
