"""Backbones: shapes, size, channels_last, and SplitBatchNorm2d against per-chunk BatchNorm2d."""

import pytest
import torch
from torch import nn

from streamssl.models.backbones import BACKBONES, SplitBatchNorm2d, build_backbone


@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_maps_images_to_feature_vectors(name: str, channels: int, size: int) -> None:
    backbone, feature_dim = build_backbone(name, channels)
    features = backbone(torch.rand(2, channels, size, size))
    assert features.shape == (2, feature_dim)
    assert feature_dim == {"convnet": 256, "resnet18": 512}[name]


def test_convnet_is_small() -> None:
    backbone, _ = build_backbone("convnet", 3)
    assert 0.3e6 <= sum(p.numel() for p in backbone.parameters()) <= 0.6e6


def test_convnet_gives_the_same_features_in_channels_last() -> None:
    torch.manual_seed(0)
    backbone, _ = build_backbone("convnet", 1)
    backbone.eval()
    images = torch.rand(4, 1, 28, 28)
    expected = backbone(images)
    backbone.to(memory_format=torch.channels_last)
    actual = backbone(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_unknown_backbone_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="convnet, resnet18"):
        build_backbone("vit", 3)


def _chunkwise_reference(split_bn: SplitBatchNorm2d, x: torch.Tensor) -> tuple[torch.Tensor, list[nn.BatchNorm2d]]:
    """Each chunk through its own fresh BatchNorm2d holding the same affine parameters and running stats."""
    outputs, norms = [], []
    for chunk in x.chunk(split_bn.num_splits):
        norm = nn.BatchNorm2d(split_bn.num_features)
        norm.load_state_dict(split_bn.state_dict())
        outputs.append(norm(chunk))
        norms.append(norm)
    return torch.cat(outputs), norms


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_split_batch_norm_in_training_equals_batch_norm_per_chunk(memory_format: torch.memory_format) -> None:
    torch.manual_seed(0)
    split_bn = SplitBatchNorm2d(3, num_splits=4)
    with torch.no_grad():
        split_bn.weight.uniform_(0.5, 2.0)
        split_bn.bias.uniform_(-1.0, 1.0)
        split_bn.running_mean.uniform_(-1.0, 1.0)
    # Chunks with clearly different statistics, so normalising the whole batch at once would differ.
    x = (torch.randn(8, 3, 5, 5) + torch.arange(8.0).view(8, 1, 1, 1)).contiguous(memory_format=memory_format)

    expected, norms = _chunkwise_reference(split_bn, x)
    actual = split_bn(x)

    torch.testing.assert_close(actual, expected)
    assert actual.is_contiguous(memory_format=memory_format)  # channels_last stays fast
    torch.testing.assert_close(split_bn.running_mean, torch.stack([n.running_mean for n in norms]).mean(0))
    torch.testing.assert_close(split_bn.running_var, torch.stack([n.running_var for n in norms]).mean(0))
    assert split_bn.num_batches_tracked.item() == 1


def test_split_batch_norm_in_eval_is_plain_batch_norm() -> None:
    torch.manual_seed(0)
    split_bn = SplitBatchNorm2d(3, num_splits=2)
    split_bn(torch.randn(8, 3, 4, 4))  # training step: moves the running stats
    plain = nn.BatchNorm2d(3)
    plain.load_state_dict(split_bn.state_dict())
    x = torch.randn(5, 3, 4, 4)  # any batch size: eval mode does not split
    torch.testing.assert_close(split_bn.eval()(x), plain.eval()(x))


def test_split_batch_norm_passes_gradients_to_its_affine_parameters() -> None:
    split_bn = SplitBatchNorm2d(3, num_splits=2)
    (split_bn(torch.randn(4, 3, 2, 2)) * torch.randn(4, 3, 2, 2)).sum().backward()
    assert split_bn.weight.grad is not None and split_bn.bias.grad is not None


def test_split_batch_norm_rejects_batches_it_cannot_split() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        SplitBatchNorm2d(3, num_splits=4)(torch.randn(6, 3, 2, 2))


@pytest.mark.parametrize("name", BACKBONES)
def test_split_bn_backbone_loads_into_a_plain_one(name: str) -> None:
    split, _ = build_backbone(name, 3, bn_splits=4)
    plain, _ = build_backbone(name, 3)
    assert any(isinstance(m, SplitBatchNorm2d) for m in split.modules())
    assert list(split.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(split.state_dict(), strict=True)
