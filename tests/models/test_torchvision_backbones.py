"""torchvision and user backbones: built as configured, trained for real, published, and rebuilt by load_encoder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from streamssl.models import load_encoder
from streamssl.models.backbones import SplitBatchNorm2d, backbone_options, build_backbone
from streamssl.models.encoder_folder import EncoderLoadError
from streamssl.models.encoder_io import Manifest, save_encoder
from streamssl.pipeline.config import ConfigError
from streamssl.pipeline.images import Trainer
from tests.conftest import tiny_config

USER_NET = "tests.models.user_backbone_net:small_net"


def _train_and_load(tmp_path: Path, lake: Path, backbone: str, **load: object) -> tuple[Trainer, nn.Module]:
    """One real step (batch 8, split BN) on the Fashion-MNIST lake, published at the end, loaded back.

    The publish gate is off: after one step at 28 px MobileNetV3's embeddings are still constant (std 0), which the
    gate rightly refuses; this test is about building, publishing and rebuilding the architecture."""
    cfg = tiny_config(tmp_path / "run", lake, f"model.backbone={backbone}", "train.max_steps=1", "train.batch_size=8",
                      "model.bn_splits=2", "moco.queue_size=16", "publish.gate=false")
    trainer = Trainer(cfg)
    before = {name: value.clone() for name, value in trainer.method.encoder().state_dict().items()}
    trainer.run()
    after = trainer.method.encoder().state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before if after[name].is_floating_point())
    return trainer, load_encoder(tmp_path / "run" / "published" / "latest", **load)  # type: ignore[arg-type]


def _assert_same_outputs(trainer: Trainer, encoder: nn.Module) -> None:
    pixels = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        expected = trainer.method.encoder().eval()((pixels - 0.286) / 0.353)
        torch.testing.assert_close(encoder(pixels), expected)
    assert expected.shape == (3, trainer.task.feature_dim)


@pytest.mark.parametrize(("name", "features"), [("resnet18", 512), ("mobilenet_v3_small", 1024)])
def test_a_torchvision_model_trains_publishes_and_loads_back(name: str, features: int, tmp_path: Path,
                                                             small_lake: Path, one_thread: None) -> None:
    trainer, encoder = _train_and_load(tmp_path, small_lake, f"torchvision:{name}")
    assert trainer.task.feature_dim == features
    manifest = encoder.manifest  # type: ignore[attr-defined]
    assert manifest["backbone"] == f"torchvision:{name}" and manifest["backbone_options"] == {"small_stem": True}
    _assert_same_outputs(trainer, encoder)


def test_a_resnet_gets_the_cifar_stem_at_small_sizes_and_keeps_imagenet_s_at_224() -> None:
    small, _ = build_backbone("torchvision:resnet18", 1, bn_splits=4, size=28)
    assert (small.conv1.in_channels, small.conv1.kernel_size, small.conv1.stride) == (1, (3, 3), (1, 1))
    assert isinstance(small.maxpool, nn.Identity) and isinstance(small.fc, nn.Identity)
    norms = [module for module in small.modules() if isinstance(module, nn.BatchNorm2d)]
    assert norms and all(isinstance(module, SplitBatchNorm2d) for module in norms)
    assert backbone_options("torchvision:resnet18", 3, 224) == {"small_stem": False}
    with torch.device("meta"):  # as load_encoder builds it: no memory, the dimension still found
        large, features = build_backbone("torchvision:resnet18", 3, size=224)
    assert (large.conv1.kernel_size, large.conv1.stride, features) == ((7, 7), (2, 2), 512)
    assert isinstance(large.maxpool, nn.MaxPool2d)


def test_another_family_gets_a_stride_one_stem_and_the_channels_asked_for() -> None:
    model, features = build_backbone("torchvision:mobilenet_v3_small", 1, size=32)
    first = model.features[0][0]
    assert (first.in_channels, first.stride, features) == (1, (1, 1), 1024)


def test_a_user_factory_trains_publishes_and_loads_only_when_trusted(tmp_path: Path, small_lake: Path,
                                                                     one_thread: None) -> None:
    trainer, _ = _train_and_load(tmp_path, small_lake, USER_NET, trusted_backbones=[USER_NET])
    assert trainer.task.feature_dim == 24  # found by a forward pass, declared nowhere
    latest = tmp_path / "run" / "published" / "latest"
    with pytest.raises(EncoderLoadError, match="user factory, and importing it runs code"):
        load_encoder(latest)  # an unsigned manifest may not choose which module gets imported
    encoder = load_encoder(latest, trusted_backbones=[USER_NET])
    assert encoder.manifest["backbone_options"] == {"in_channels": 1}
    _assert_same_outputs(trainer, encoder)


def test_a_signed_encoder_or_the_environment_vouches_for_its_factory(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    backbone, features = build_backbone(USER_NET, 3, size=32)
    manifest = Manifest(backbone=USER_NET, embedding_dim=features, backbone_options={"in_channels": 3},
                        input={"channels": 3, "height": 32, "width": 32, "mean": [0.5] * 3, "std": [0.25] * 3})
    monkeypatch.setenv("STREAMSSL_ENCODER_KEY", "a key the publisher and the consumer share")
    save_encoder(tmp_path / "signed", backbone, manifest)
    assert load_encoder(tmp_path / "signed").manifest["backbone"] == USER_NET  # the signature vouches for it
    monkeypatch.delenv("STREAMSSL_ENCODER_KEY")
    save_encoder(tmp_path / "unsigned", backbone, manifest)
    monkeypatch.setenv("STREAMSSL_TRUSTED_BACKBONES", f"other.module:net,{USER_NET}")
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_encoder(tmp_path / "unsigned")(pixels), backbone.eval()((pixels - 0.5) / 0.25))


def test_a_factory_without_in_channels_is_called_without_arguments() -> None:
    assert backbone_options("tests.models.user_backbone_net:grey_net", 1, 28) == {}
    _, features = build_backbone("tests.models.user_backbone_net:grey_net", 1, size=28)
    assert features == 8


@pytest.mark.parametrize(("backbone", "message"), [
    ("torchvision:nope", r"model.backbone: unknown torchvision model 'nope'; valid: alexnet, .*resnet18"),
    ("torchvision:vit_b_16", r"vision transformers"),
    ("no_such_package.nets:make", r"cannot import no_such_package.nets .*must be importable"),
    ("tests.models.user_backbone_net:missing", r"has no callable missing"),
    ("tests.models.user_backbone_net:not_a_module", r"returned str, not a torch.nn.Module"),
    ("tests.models.user_backbone_net:grey_net", r"does not run on \[1, 3, 28, 28\] images"),
])
def test_a_backbone_that_cannot_be_built_is_one_config_error(backbone: str, message: str, tmp_path: Path,
                                                               small_lake: Path) -> None:
    sets = [f"model.backbone={backbone}", "eval.dataset=none"]
    if "grey_net" in backbone:
        sets += ["data.channels=3", "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]"]
    with pytest.raises(ConfigError, match=message):
        Trainer(tiny_config(tmp_path, small_lake, *sets))
    assert not (tmp_path / "checkpoints").exists()


def test_a_backbone_name_of_no_known_form_is_refused_with_the_choices(tmp_path: Path, small_lake: Path) -> None:
    with pytest.raises(ConfigError, match=r"is not one of convnet, resnet18, torchvision:NAME, package\.module:factory"):
        tiny_config(tmp_path, small_lake, "model.backbone=not a name")
