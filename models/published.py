"""What `load_encoder` returns: a backbone wrapped with the input normalisation its manifest names, so that a
consumer cannot get the preprocessing wrong."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class _Normalised(nn.Module):
    """A backbone fed (x - mean) / std per channel; `manifest` is a `Manifest.to_dict()` (today's names)."""

    # Buffers registered in __init__; declared so that they type as Tensor, not Tensor | Module.
    mean: Tensor
    std: Tensor

    def __init__(self, backbone: nn.Module, manifest: dict[str, Any], mean: list[float], std: list[float],
                 spatial_dims: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.manifest = manifest
        shape = (1, -1, *[1] * spatial_dims)
        # Not persistent: they come from the manifest, the weights file holds the backbone alone.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(shape), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone((x - self.mean) / self.std)


class PublishedEncoder(_Normalised):
    """A backbone plus its input normalisation: float images [B, C, H, W] in [0, 1] -> embeddings [B, D]."""

    def __init__(self, backbone: nn.Module, manifest: dict[str, Any]) -> None:
        spec = manifest["input"]
        super().__init__(backbone, manifest, spec["mean"], spec["std"], spatial_dims=2)

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_floating_point():
            # uint8 pixels in 0..255 would be normalised into nonsense without any error
            raise TypeError(f"expected float images in [0, 1], got dtype {x.dtype}")
        return super().forward(x)


class PublishedSeriesEncoder(_Normalised):
    """A series trunk: float windows [B, C, T] -> features [B, D].

    Inputs are z-scored per channel with the manifest's `input.mean` / `input.std` where it has them (the offline
    forecaster); a streaming run normalises per series, so its manifest lists each series' mean/std instead and
    the caller z-scores with those.
    """

    def __init__(self, backbone: nn.Module, manifest: dict[str, Any]) -> None:
        spec = manifest["input"]
        super().__init__(backbone, manifest, spec.get("mean", [0.0] * spec["channels"]),
                         spec.get("std", [1.0] * spec["channels"]), spatial_dims=1)
