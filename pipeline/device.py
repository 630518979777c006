"""Which device a run uses and whether it autocasts to bf16."""

from __future__ import annotations

import torch

from streamssl.pipeline.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """`train.device` as a device; a name that is not one, or CUDA where there is none, is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda requested but no CUDA device is available")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto`: bf16 autocast where the hardware runs it natively (≈2× the fp32 step on such CPUs), else fp32."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
