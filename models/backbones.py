"""Backbones: the image encoders every SSL method trains and every published artifact contains.

`build_backbone(name, in_channels, size=...)` returns a module mapping float images [B, C, H, W] to features
[B, feature_dim], plus that feature_dim, which is found by one forward pass of a dummy image (eval mode, no
grad), never declared. The choices:

* "convnet": four conv3x3-BN-ReLU blocks (32/64/128/256 channels, max-pool after blocks 2-4) and a
  global average pool; ~0.39 M parameters, small enough to train at useful speed on a CPU.
* "resnet18": torchvision's ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool), since the
  ImageNet stem throws away most of a 32x32 image in its first two layers; meant for GPUs.
* "torchvision:NAME": one of torchvision's classification models, untrained (torchvision_backbones.py).
* "package.module:factory": a user's own nn.Module (user_backbones.py has the contract).

`backbone_options(name, in_channels, size)` are the options the last two are built with; the manifest records
them, so that `load_encoder` rebuilds the same module whatever the defaults are by then.

With `bn_splits > 1` every BatchNorm2d becomes a `SplitBatchNorm2d`, which normalises each of
`bn_splits` chunks of the batch on its own, like per-GPU BN in a multi-GPU run. MoCo needs this on a
single device: with one BN over the whole batch, queries and their keys share batch statistics and the
network can cheat the pretext task through them (He et al. 2020, "Shuffling BN").
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamssl.models import torchvision_backbones, user_backbones

BACKBONES = ("convnet", "resnet18")

NormLayer = Callable[[int], nn.Module]


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training mode, normalises `num_splits` equal chunks of the batch separately.

    The running statistics are updated with the average of the chunks' statistics. In eval mode it is
    plain BatchNorm2d. It adds no parameters or buffers, so its state_dict has exactly BatchNorm2d's keys
    and a model trained with it loads into one built with plain BatchNorm2d.
    """

    # BatchNorm2d's buffers, which torch types as optional (a layer built with track_running_stats=False has
    # none); this one always tracks them.
    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor

    def __init__(self, num_features: int, num_splits: int) -> None:
        super().__init__(num_features)
        self.num_splits = num_splits

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        if len(x) % self.num_splits:
            raise ValueError(f"batch size {len(x)} is not divisible by bn_splits={self.num_splits}")
        self.num_batches_tracked.add_(1)
        # As in BatchNorm2d, momentum=None means a cumulative average over all batches seen.
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        # Every chunk updates its own copy of the running stats, as every GPU would; the copies are averaged.
        # A loop over batch slices, not one reshaped batch_norm call: slices keep channels_last, and on a
        # CPU this measured as fast as plain BatchNorm2d while the reshaping copies cost ~40%.
        outputs, running_means, running_vars = [], [], []
        for chunk in x.chunk(self.num_splits):
            running_mean, running_var = self.running_mean.clone(), self.running_var.clone()
            outputs.append(F.batch_norm(chunk, running_mean, running_var, self.weight, self.bias,
                                        True, momentum, self.eps))
            running_means.append(running_mean)
            running_vars.append(running_var)
        self.running_mean.copy_(torch.stack(running_means).mean(0))
        self.running_var.copy_(torch.stack(running_vars).mean(0))
        return torch.cat(outputs)


def backbone_options(name: str, in_channels: int, size: int) -> dict[str, Any]:
    """The options `build_backbone` uses for `name` when given none (the built-in two record their input channels)."""
    if name.startswith(torchvision_backbones.PREFIX):
        return torchvision_backbones.default_options(size)
    if user_backbones.is_user_name(name):
        return user_backbones.default_options(name, in_channels)
    return {"in_channels": in_channels}


def is_image_backbone(name: str) -> bool:
    """Whether `name` has the form of an image backbone (a manifest check: nothing is imported)."""
    return name in BACKBONES or user_backbones.is_user_name(name)  # "torchvision:NAME" has that form too


def build_backbone(name: str, in_channels: int, bn_splits: int = 1, *, size: int = 32,
                   options: dict[str, Any] | None = None) -> tuple[nn.Module, int]:
    """Returns (backbone, feature_dim); ValueError with one line (the valid choices) for a name it cannot build.

    `size` is the side of the images it will see (the stem of a torchvision model and the dummy forward pass
    depend on it); `options` default to `backbone_options(name, in_channels, size)`.
    """
    if bn_splits < 1:
        raise ValueError(f"bn_splits must be >= 1, got {bn_splits}")
    norm_layer: NormLayer = (nn.BatchNorm2d if bn_splits == 1
                             else partial(SplitBatchNorm2d, num_splits=bn_splits))
    options = backbone_options(name, in_channels, size) if options is None else options
    model: nn.Module
    if name == "convnet":
        model = _convnet(in_channels, norm_layer)
    elif name == "resnet18":
        model = _cifar_resnet18(in_channels, norm_layer)
    elif name.startswith(torchvision_backbones.PREFIX):
        model = _split_batch_norms(torchvision_backbones.build_torchvision(
            name.removeprefix(torchvision_backbones.PREFIX), in_channels, options), bn_splits)
    elif user_backbones.is_user_name(name):
        model = _split_batch_norms(user_backbones.build_user(name, options), bn_splits)
    else:
        raise ValueError(f"unknown backbone '{name}'; valid: {', '.join(BACKBONES)}, torchvision:NAME "
                         "(a torchvision classification model) or package.module:factory (your own nn.Module)")
    return model, _feature_dim(name, model, in_channels, size)


def _feature_dim(name: str, model: nn.Module, in_channels: int, size: int) -> int:
    """D of the model's [1, D] output for one dummy image, on the model's device (the meta device when loading)."""
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else None
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(torch.zeros(1, in_channels, size, size, device=device))
    except Exception as error:  # the model's own refusal (too small an image, wrong channels): one line
        raise ValueError(f"backbone '{name}' does not run on [1, {in_channels}, {size}, {size}] images: "
                         f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
    finally:
        model.train(training)
    if not isinstance(output, Tensor) or output.ndim != 2:
        shape = list(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise ValueError(f"backbone '{name}' must return features [B, D], got {shape}")
    return int(output.shape[1])


def _split_batch_norms(model: nn.Module, bn_splits: int) -> nn.Module:
    """Every plain BatchNorm2d in `model` as a SplitBatchNorm2d with the same settings and state."""
    if bn_splits == 1:
        return model
    for name, module in list(model.named_modules()):
        if type(module) is nn.BatchNorm2d and module.track_running_stats and module.affine:
            split = SplitBatchNorm2d(module.num_features, bn_splits)
            split.eps, split.momentum = module.eps, module.momentum
            split.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, split)
    return model


def _conv_block(in_channels: int, out_channels: int, norm_layer: NormLayer, *,
                downsample: bool) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv=nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),  # BN supplies the bias
        norm=norm_layer(out_channels),
        relu=nn.ReLU(inplace=True),
    )
    if downsample:
        layers["pool"] = nn.MaxPool2d(2)  # floors odd sizes: 28 -> 14 -> 7 -> 3 for Fashion-MNIST
    return nn.Sequential(layers)


def _convnet(in_channels: int, norm_layer: NormLayer) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        block1=_conv_block(in_channels, 32, norm_layer, downsample=False),
        block2=_conv_block(32, 64, norm_layer, downsample=True),
        block3=_conv_block(64, 128, norm_layer, downsample=True),
        block4=_conv_block(128, 256, norm_layer, downsample=True),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
    ))


def _cifar_resnet18(in_channels: int, norm_layer: NormLayer) -> nn.Module:
    # Imported here: torchvision adds ~1.5 s to `import streamssl.models`, and the CPU default is the convnet.
    from torchvision.models import resnet18

    model = resnet18(weights=None, norm_layer=norm_layer)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    model.fc = nn.Identity()  # forward then ends at the flattened 512-d average pool
    return model
