"""A user's own backbone: `model.backbone=package.module:factory`.

The contract: `factory` is a callable importable as `package.module:factory` wherever the encoder is trained
*and* wherever a consumer loads it (installed, or on PYTHONPATH). It returns an `nn.Module` that maps float
images [B, C, H, W] (normalised as data.mean/std say) to features [B, D]. If its signature accepts
`in_channels` it is called as `factory(in_channels=C)`, otherwise as `factory()` and the module must take C
channels as it is. D is found by a forward pass, not declared. Every `nn.BatchNorm2d` in it becomes a
`SplitBatchNorm2d` under model.bn_splits > 1, as in the built-in backbones.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
from collections.abc import Callable, Collection
from typing import Any

from torch import nn

TRUSTED_ENV = "STREAMSSL_TRUSTED_BACKBONES"  # comma-separated factories a consumer's load_encoder may import
# module path : attribute; dots only in the module part
USER_NAME = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def is_user_name(name: str) -> bool:
    return USER_NAME.fullmatch(name) is not None


def refuse_untrusted(name: str, trusted: Collection[str]) -> None:
    """ValueError when `name` is a user factory that neither `trusted` nor STREAMSSL_TRUSTED_BACKBONES names.

    `load_encoder` passes the factories its caller trusts, plus the manifest's own when its signature verified:
    importing a module runs its code, so an unsigned manifest from anyone must not pick which module runs.
    """
    if name.startswith("torchvision:") or not is_user_name(name):
        return
    if name in trusted or name in os.environ.get(TRUSTED_ENV, "").split(","):
        return
    raise ValueError(f"backbone {name} is a user factory, and importing it runs code: it loads from a signed encoder "
                     f"(STREAMSSL_ENCODER_KEY), or when trusted (load_encoder(..., trusted_backbones=[{name!r}]) or "
                     f"{TRUSTED_ENV}={name}); its module must be importable here")


def _factory(name: str) -> Callable[..., Any]:
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import {module_name} for backbone '{name}' ({error}): a user backbone's module "
                         "must be importable (installed or on PYTHONPATH) wherever it is trained or loaded") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"backbone '{name}': {module_name} has no callable {attribute}")
    return factory


def default_options(name: str, in_channels: int) -> dict[str, Any]:
    """{"in_channels": C} when the factory takes it, else {}: how it is called (what the manifest records)."""
    factory = _factory(name)
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a callable without a readable signature: called without arguments
        return {}
    takes = "in_channels" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    return {"in_channels": in_channels} if takes else {}


def build_user(name: str, options: dict[str, Any]) -> nn.Module:
    """`factory(**options)`; ValueError when it cannot be imported, fails, or returns no nn.Module."""
    factory = _factory(name)
    try:
        module = factory(**options)
    except Exception as error:  # the user's code: whatever it raises is one line
        raise ValueError(f"backbone '{name}' failed to build with {options}: {type(error).__name__}: {error}") from None
    if not isinstance(module, nn.Module):
        raise ValueError(f"backbone '{name}' returned {type(module).__name__}, not a torch.nn.Module")
    return module
