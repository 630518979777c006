"""torchvision's classification models as backbones: `model.backbone=torchvision:NAME`.

Built with `weights=None`, so nothing is ever downloaded: the run trains them from scratch. Three changes
turn a classifier into a backbone for our images:

* Channels: the first convolution takes `in_channels` (re-initialised like torchvision's own convolutions)
  when that is not 3.
* Stem (option `small_stem`, on by default at data.size <= 64): ImageNet stems divide the side by 4 before
  the first block, which leaves a 28 or 32 px image almost nothing. ResNet, ResNeXt and Wide ResNet get the
  CIFAR stem (a 3x3 stride-1 first convolution, no max-pool), as the built-in `resnet18`; every other family
  keeps its first convolution's kernel with stride 1, and loses a max-pool that directly follows it
  (DenseNet, ShuffleNet, GoogLeNet).
* Head: the last `nn.Linear` (the classifier; for VGG, AlexNet and MobileNetV3 the last of their MLP head)
  becomes `nn.Identity`, so the model returns its pooled features.

Vision transformers (ViT, Swin, MaxViT) are refused: their patch grid is tied to one image size. So is
SqueezeNet, whose classifier is a convolution. GoogLeNet and Inception v3 are built without their auxiliary
classifiers.
"""

from __future__ import annotations

from typing import Any

from torch import nn

PREFIX = "torchvision:"
SMALL_IMAGE = 64  # at or below this side the stem keeps full resolution (`small_stem`)
_REFUSED = {"vit_": "vision transformers tie their patch grid to one image size",
            "swin_": "vision transformers tie their patch grid to one image size",
            "maxvit_": "vision transformers tie their patch grid to one image size",
            "squeezenet": "its classifier is a convolution, not a linear layer to remove"}
_CONSTRUCTOR_OPTIONS = {"googlenet": {"aux_logits": False, "init_weights": True},
                        "inception_v3": {"aux_logits": False, "init_weights": True}}
OPTIONS = ("small_stem",)


def torchvision_names() -> list[str]:
    """torchvision's classification models (the top-level `torchvision.models` registry)."""
    # Imported here: torchvision adds ~1.5 s to `import streamssl.models`, and the CPU default is the convnet.
    from torchvision import models

    return sorted(models.list_models(module=models))


def default_options(size: int) -> dict[str, Any]:
    """The options a `torchvision:` backbone gets for images of side `size` (what the manifest records)."""
    return {"small_stem": size <= SMALL_IMAGE}


def build_torchvision(name: str, in_channels: int, options: dict[str, Any]) -> nn.Module:
    """torchvision model `name` adapted as above; ValueError naming the valid choices for anything else."""
    from torchvision import models

    names = torchvision_names()
    refused = next((why for prefix, why in _REFUSED.items() if name.startswith(prefix)), "")
    if refused and name in names:
        raise ValueError(f"{PREFIX}{name} is not supported as a backbone: {refused}")
    if name not in names:
        valid = [known for known in names if not known.startswith(tuple(_REFUSED))]
        raise ValueError(f"unknown torchvision model '{name}'; valid: {', '.join(valid)}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown or not isinstance(options.get("small_stem", False), bool):
        raise ValueError(f"{PREFIX}{name}: options must be {{'small_stem': true/false}}, got {options}")
    model = models.get_model(name, weights=None, **_CONSTRUCTOR_OPTIONS.get(name, {}))
    small = bool(options.get("small_stem", False))
    if isinstance(model, models.ResNet) and small:
        model.conv1 = _conv(in_channels, model.conv1.out_channels, 3, 1, 1)
        model.maxpool = nn.Identity()
    else:
        _adapt_first_conv(model, in_channels, small)
    head = [module_name for module_name, module in model.named_modules() if isinstance(module, nn.Linear)]
    _replace(model, head[-1], nn.Identity())
    return model


def _conv(in_channels: int, out_channels: int, kernel: Any, stride: Any, padding: Any, bias: bool = False) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, bias=bias)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's CNNs
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _adapt_first_conv(model: nn.Module, in_channels: int, small: bool) -> None:
    """The first convolution with `in_channels` inputs (stride 1 when `small`), and no max-pool right after it."""
    convs = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    name, first = convs[0]
    if in_channels != first.in_channels or (small and first.stride != (1, 1)):
        _replace(model, name, _conv(in_channels, first.out_channels, first.kernel_size,
                                    1 if small else first.stride, first.padding, first.bias is not None))
    if not small:
        return
    # Module order is construction order, which for torchvision's CNNs is the order of the forward pass.
    seen_first = False
    for module_name, module in model.named_modules():
        if module_name == convs[1][0]:
            return
        seen_first = seen_first or module_name == name
        if seen_first and isinstance(module, nn.MaxPool2d):
            _replace(model, module_name, nn.Identity())
            return


def _replace(model: nn.Module, dotted: str, replacement: nn.Module) -> None:
    parent, _, child = dotted.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, replacement)
