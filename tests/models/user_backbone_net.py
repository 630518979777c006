"""A user's own backbone factories, as a team would write them in their own package (tests import them by name)."""

from __future__ import annotations

from torch import nn

FEATURES = 24


def small_net(in_channels: int) -> nn.Module:
    """conv-BN-ReLU, global pool: [B, in_channels, H, W] -> [B, 24]."""
    return nn.Sequential(nn.Conv2d(in_channels, FEATURES, 3, padding=1, bias=False), nn.BatchNorm2d(FEATURES),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def grey_net() -> nn.Module:
    """No in_channels parameter: called as grey_net(), takes 1 channel."""
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def not_a_module() -> str:
    return "a string"
