"""Published encoders: what a downstream consumer loads, without any training code.

A published encoder is a folder with two files:
* `encoder.safetensors`: the backbone's state_dict (weights and BN running statistics; no pickle).
* `manifest.json`: a `Manifest`: version, step, samples seen, method, backbone name, embedding size, the
  input spec with its normalisation, eval metrics, and `files`: the sha256 of every other file in the folder.

`load_encoder(folder)` checks every hash, rebuilds the backbone by name and returns a
`PublishedEncoder` that takes images in [0, 1] and applies the manifest's normalisation itself, so a
consumer cannot get the preprocessing wrong. This module imports only torch, safetensors and the
backbone definitions.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from streamssl.models.backbones import build_backbone
from streamssl.models.forecaster import build_trunk
from streamssl.models.series_backbones import PooledSeriesEncoder, build_series_encoder
from streamssl.streams.files import atomic_write

WEIGHTS_FILE = "encoder.safetensors"
MANIFEST_FILE = "manifest.json"


# Names manifests were written with before every publisher filled one Manifest; still read.
OLD_NAMES = {"feature_dim": "embedding_dim", "eval": "metrics"}


class EncoderLoadError(Exception):
    """A published encoder folder is missing, incomplete, tampered with or does not fit its backbone."""


@dataclass
class Manifest:
    """What manifest.json says about a published encoder: every publisher fills one, `load_encoder` parses it.

    backbone: The architecture by name: an image backbone, "series-conv" or "forecaster-TRUNK".
    input: What the encoder takes: channels and size (images) or window and lag (series), and the normalisation:
        mean/std per channel, or (a streaming series run) each series' own under "series".
    embedding_dim: D of the embeddings [B, D] it returns.
    method, step, samples_seen: What trained it, and how far.
    metrics: Eval metrics of exactly these weights (kNN top-1, rolling or test nRMSE, ...).
    backbone_options: Keyword options the backbone was built with.
    version, created_at, files: Set when published: the version, the UTC time, the sha256 of every other file.
    extra: What one kind of job adds (a forecaster's mode, grouping, decomposition, targets, best step, series
        name); written at the top level, next to the fields above.
    """

    backbone: str
    input: dict[str, Any]
    embedding_dim: int
    method: str = ""
    step: int = 0
    samples_seen: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    backbone_options: dict[str, Any] = field(default_factory=dict)
    version: int = 0
    created_at: str = ""
    files: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clash = sorted(self.extra.keys() & (_FIELD_NAMES | OLD_NAMES.keys()))
        if clash:
            raise ValueError(f"Manifest.extra must not repeat a field's name: {clash}")

    def to_dict(self) -> dict[str, Any]:
        """As manifest.json holds it: the fields, and `extra` next to them."""
        return {**self.extra, **{name: getattr(self, name) for name in _FIELD_NAMES}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """A manifest.json's contents, old names included; TypeError when backbone, input or embedding_dim is missing."""
        renamed = {OLD_NAMES.get(name, name): value for name, value in data.items()}
        return cls(**{name: value for name, value in renamed.items() if name in _FIELD_NAMES},
                   extra={name: value for name, value in renamed.items() if name not in _FIELD_NAMES})


_FIELD_NAMES = frozenset(item.name for item in fields(Manifest)) - {"extra"}


class PublishedEncoder(nn.Module):
    """A backbone plus its input normalisation: float images [B, C, H, W] in [0, 1] -> embeddings [B, D].

    `manifest` is a `Manifest.to_dict()` (what `load_encoder` passes: today's names, whatever the folder has).
    """

    # Buffers registered in __init__; declared so that they type as Tensor, not Tensor | Module.
    mean: Tensor
    std: Tensor

    def __init__(self, backbone: nn.Module, manifest: dict[str, Any]) -> None:
        super().__init__()
        self.backbone = backbone
        self.manifest = manifest
        spec = manifest["input"]
        # Not persistent: they come from the manifest, the weights file holds the backbone alone.
        self.register_buffer("mean", torch.tensor(spec["mean"], dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(spec["std"], dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_floating_point():
            # uint8 pixels in 0..255 would be normalised into nonsense without any error
            raise TypeError(f"expected float images in [0, 1], got dtype {x.dtype}")
        return self.backbone((x - self.mean) / self.std)


class PublishedSeriesEncoder(nn.Module):
    """A series trunk: float windows [B, C, T] -> features [B, D].

    Inputs are z-scored per channel with the manifest's `input.mean` / `input.std` where it has them (the offline
    forecaster); a streaming run normalises per series, so its manifest lists each series' mean/std instead and
    the caller z-scores with those.
    """

    # Buffers registered in __init__; declared so that they type as Tensor, not Tensor | Module.
    mean: Tensor
    std: Tensor

    def __init__(self, backbone: nn.Module, manifest: dict[str, Any]) -> None:
        super().__init__()
        self.backbone = backbone
        self.manifest = manifest
        spec = manifest["input"]
        mean, std = spec.get("mean", [0.0] * spec["channels"]), spec.get("std", [1.0] * spec["channels"])
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone((x - self.mean) / self.std)


def _build(manifest: Manifest) -> tuple[nn.Module, PublishedEncoder | PublishedSeriesEncoder]:
    """(backbone, the wrapper that feeds it) for the manifest's backbone name."""
    name, spec, written = manifest.backbone, manifest.input, manifest.to_dict()
    if name.startswith("forecaster-"):  # the forecaster's shared trunk over the last `lag` points
        backbone = build_trunk(name.removeprefix("forecaster-"), spec["channels"], spec["lag"], manifest.embedding_dim)
        return backbone, PublishedSeriesEncoder(backbone, written)
    if name == "series-conv":  # CPC's encoder, mean-pooled over time
        encoder, _ = build_series_encoder("conv", spec["channels"], hidden=manifest.embedding_dim)
        backbone = PooledSeriesEncoder(encoder)
        return backbone, PublishedSeriesEncoder(backbone, written)
    backbone, _ = build_backbone(name, spec["channels"])
    return backbone, PublishedEncoder(backbone, written)


def save_encoder(folder: Path, backbone: nn.Module, manifest: Manifest) -> dict[str, Any]:
    """Writes `backbone` and `manifest` (with `files`: the weights' sha256) into `folder`.

    Returns the manifest as written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # contiguous: channels_last weights would otherwise be saved with their strides lost
    tensors = {name: value.detach().cpu().contiguous() for name, value in backbone.state_dict().items()}
    weights = save_safetensors(tensors)
    (folder / WEIGHTS_FILE).write_bytes(weights)
    full_manifest = replace(manifest, files={WEIGHTS_FILE: hashlib.sha256(weights).hexdigest()}).to_dict()
    # The manifest goes last and by rename, so a folder with a manifest always has complete weights.
    # The publisher fsyncs the whole version folder before it becomes visible.
    with atomic_write(folder / MANIFEST_FILE, durable=False) as handle:
        handle.write((json.dumps(full_manifest, indent=2, sort_keys=True) + "\n").encode())
    return full_manifest


def load_encoder(folder: str | Path, device: str = "cpu") -> PublishedEncoder | PublishedSeriesEncoder:
    """Loads a published encoder (a version folder or a `latest` symlink to one) in eval mode."""
    # Resolve the symlink once: if `latest` flips while we read, we still read one consistent version.
    folder = Path(folder).resolve()
    try:
        written = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError) as error:
        raise EncoderLoadError(f"{folder / MANIFEST_FILE}: cannot read manifest ({error})") from error
    try:
        manifest = Manifest.from_dict(written)
    except (TypeError, ValueError, AttributeError) as error:  # AttributeError: not a JSON object
        raise EncoderLoadError(f"{folder / MANIFEST_FILE}: invalid manifest ({error!r})") from error
    files = manifest.files
    if WEIGHTS_FILE not in files:
        raise EncoderLoadError(f"{folder / MANIFEST_FILE}: lists no sha256 for {WEIGHTS_FILE}")
    contents = {name: _read_verified(folder / name, expected) for name, expected in files.items()}

    try:
        backbone, encoder = _build(manifest)
    except (KeyError, ValueError, TypeError) as error:
        raise EncoderLoadError(f"{folder / MANIFEST_FILE}: invalid manifest ({error!r})") from error
    # Loaded from the verified bytes, not re-read from disk, so what was hashed is what is used.
    _load_weights_strictly(backbone, load_safetensors(contents[WEIGHTS_FILE]), folder / WEIGHTS_FILE)
    return encoder.to(device).eval()


def _read_verified(path: Path, expected_sha256: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise EncoderLoadError(f"{path}: in the manifest but unreadable ({error.strerror})") from error
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise EncoderLoadError(f"{path}: sha256 mismatch (manifest {expected_sha256[:12]}…, "
                               f"file {actual[:12]}…)")
    return data


def _load_weights_strictly(backbone: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    expected = backbone.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shared = expected.keys() & state.keys()
    misshapen = sorted(name for name in shared if expected[name].shape != state[name].shape)
    if missing or unexpected or misshapen:
        raise EncoderLoadError(f"{path}: does not fit the backbone (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}, wrong shape {misshapen[:3]})")
    backbone.load_state_dict(state, strict=True)
