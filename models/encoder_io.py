"""Published encoders: what a downstream consumer loads, without any training code.

A published encoder is a folder with two files (three when signed):
* `encoder.safetensors`: the backbone's state_dict (weights and BN running statistics; no pickle).
* `manifest.json`: a `Manifest`: version, step, samples seen, method, backbone name, embedding size, the
  input spec with its normalisation, eval metrics, and `files`: the sha256 of every other file in the folder.
* `manifest.json.hmac`, where STREAMSSL_ENCODER_KEY is set: see `encoder_signing`.
* what the publisher's artifacts add: `encoder.onnx` (`onnx_export`), the model card `README.md` (`model_card`).

`load_encoder(folder)` trusts nothing in the folder: it checks the manifest (`encoder_checks`), keeps every
file it reads inside the folder, builds the named backbone on the meta device to compare the weights'
header with it before reading a tensor, checks every hash, and returns a `PublishedEncoder` that takes
images in [0, 1] and applies the manifest's normalisation itself, so a consumer cannot get the
preprocessing wrong. This module imports only torch, safetensors and the backbone definitions.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from streamssl.models.artifacts import Artifact
from streamssl.models.backbones import build_backbone
from streamssl.models.encoder_checks import (
    MAX_HEADER_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_WEIGHTS_BYTES,
    OLD_NAMES,
    check_manifest,
    check_weights_header,
    expected_layout,
    parse_manifest_json,
)
from streamssl.models.encoder_folder import EncoderLoadError, read_inside, resolve_folder, sha256_inside
from streamssl.models.encoder_signing import (
    KEY_ENV,
    MAX_SIGNATURE_BYTES,
    SIGNATURE_FILE,
    sign,
    signature_matches,
    signing_key,
)
from streamssl.models.forecaster import build_trunk
from streamssl.models.published import PublishedEncoder, PublishedSeriesEncoder
from streamssl.models.series_backbones import PooledSeriesEncoder, build_series_encoder
from streamssl.models.user_backbones import refuse_untrusted
from streamssl.streams.files import atomic_write

WEIGHTS_FILE = "encoder.safetensors"
MANIFEST_FILE = "manifest.json"


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
    lineage, onnx: Where the weights came from (pipeline/lineage.py); the ONNX export, or None and `onnx_unavailable`.
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
    lineage: dict[str, Any] = field(default_factory=dict)
    onnx: dict[str, Any] | None = None
    onnx_unavailable: str = ""
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



def build_published(manifest: Manifest, trusted: Collection[str] = ()
                    ) -> tuple[nn.Module, type[PublishedEncoder] | type[PublishedSeriesEncoder]]:
    """The manifest's backbone (freshly initialised) and the wrapper that feeds it, as `load_encoder` builds them;
    a user's factory only if `trusted` (user_backbones)."""
    name, spec = manifest.backbone, manifest.input
    if name.startswith("forecaster-"):  # the forecaster's shared trunk over the last `lag` points
        trunk = build_trunk(name.removeprefix("forecaster-"), spec["channels"], spec["lag"], manifest.embedding_dim)
        return trunk, PublishedSeriesEncoder
    if name == "series-conv":  # CPC's encoder, mean-pooled over time
        encoder, _ = build_series_encoder("conv", spec["channels"], hidden=manifest.embedding_dim)
        return PooledSeriesEncoder(encoder), PublishedSeriesEncoder
    refuse_untrusted(name, trusted)
    backbone, feature_dim = build_backbone(name, spec["channels"], size=spec.get("height", 32),
                                           options=manifest.backbone_options)
    if feature_dim != manifest.embedding_dim:
        raise ValueError(f"embedding_dim is {manifest.embedding_dim}, but {name} gives {feature_dim}")
    return backbone, PublishedEncoder


def save_encoder(folder: Path, backbone: nn.Module, manifest: Manifest, artifacts: Sequence[Artifact] = ()) -> dict[str, Any]:
    """Writes `backbone`, each of `artifacts` in turn (each sees the manifest so far) and `manifest` (with
    `files`: every file's sha256) into `folder`, and the manifest's HMAC where STREAMSSL_ENCODER_KEY is set.

    Returns the manifest as written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # contiguous: channels_last weights would otherwise be saved with their strides lost
    tensors = {name: value.detach().cpu().contiguous() for name, value in backbone.state_dict().items()}
    weights = save_safetensors(tensors)
    (folder / WEIGHTS_FILE).write_bytes(weights)
    manifest = replace(manifest, files={WEIGHTS_FILE: hashlib.sha256(weights).hexdigest()})
    for artifact in artifacts:
        manifest = artifact(folder, backbone, manifest)
    full_manifest = manifest.to_dict()
    text = (json.dumps(full_manifest, indent=2, sort_keys=True) + "\n").encode()
    key = signing_key()
    if key is None:
        (folder / SIGNATURE_FILE).unlink(missing_ok=True)  # a stale signature would refuse the new manifest
    else:
        with atomic_write(folder / SIGNATURE_FILE, durable=False) as handle:
            handle.write(sign(text, key).encode())
    # The manifest goes last and by rename, so a folder with a manifest always has complete weights.
    # The publisher fsyncs the whole version folder before it becomes visible.
    with atomic_write(folder / MANIFEST_FILE, durable=False) as handle:
        handle.write(text)
    return full_manifest


def load_encoder(folder: str | Path, device: str = "cpu", *, trusted_backbones: Collection[str] = ()
                 ) -> PublishedEncoder | PublishedSeriesEncoder:
    """Loads a published encoder (a version folder, or a `latest` link to one beside it) in eval mode; a user's
    backbone factory only when signed or trusted (`trusted_backbones`, see user_backbones.refuse_untrusted).

    Any folder it cannot use, whatever was done to it, is one `EncoderLoadError` whose message names the
    file and the problem.
    """
    folder = resolve_folder(Path(folder))
    raw = read_inside(folder, MANIFEST_FILE, MAX_MANIFEST_BYTES)
    key = signing_key()
    if key is not None:  # authenticate before parsing anything
        _check_signature(folder, raw, key)
    try:
        written = parse_manifest_json(raw)
        check_manifest(written)
        manifest = Manifest.from_dict(written)
        if WEIGHTS_FILE not in manifest.files:
            raise ValueError(f"files lists no sha256 for {WEIGHTS_FILE}")
        # On the meta device: the shapes and dtypes the weights must have, with nothing allocated yet.
        with torch.device("meta"):
            backbone, wrapper = build_published(manifest, [*trusted_backbones, *([manifest.backbone] if key else [])])
        layout, data_bytes = expected_layout(backbone.state_dict())
        if data_bytes > MAX_WEIGHTS_BYTES:
            raise ValueError(f"its backbone would take {data_bytes} bytes of weights, more than {MAX_WEIGHTS_BYTES}")
    except (ValueError, TypeError, KeyError, RuntimeError) as error:  # the last three: a check missed something
        raise EncoderLoadError(f"{folder / MANIFEST_FILE}: invalid manifest: {error}") from error

    weights, weights_path = read_inside(folder, WEIGHTS_FILE, 8 + MAX_HEADER_BYTES + data_bytes), folder / WEIGHTS_FILE
    for name, expected in manifest.files.items():
        actual = hashlib.sha256(weights).hexdigest() if name == WEIGHTS_FILE else sha256_inside(folder, name)
        if actual != expected:
            raise EncoderLoadError(f"{folder / name}: sha256 mismatch (manifest {expected[:12]}…, file {actual[:12]}…)")
    try:
        check_weights_header(weights, layout, data_bytes)
    except ValueError as error:
        raise EncoderLoadError(f"{weights_path}: {error}") from error
    try:
        # Storage for the checked layout, filled from the verified bytes (not re-read from disk, so what was
        # hashed is what is used); every tensor is in the file, so nothing stays uninitialised.
        backbone.to_empty(device="cpu").load_state_dict(load_safetensors(weights), strict=True)
    except (SafetensorError, RuntimeError) as error:
        raise EncoderLoadError(f"{weights_path}: unreadable weights ({str(error)[:200]})") from error
    return wrapper(backbone, manifest.to_dict()).to(device).eval()


def _check_signature(folder: Path, manifest: bytes, key: bytes) -> None:
    path = folder / SIGNATURE_FILE
    if not os.path.lexists(path):
        raise EncoderLoadError(f"{folder}: unsigned (no {SIGNATURE_FILE}), and with {KEY_ENV} set only signed "
                               "encoders load")
    if not signature_matches(manifest, read_inside(folder, SIGNATURE_FILE, MAX_SIGNATURE_BYTES), key):
        raise EncoderLoadError(f"{path}: does not match {MANIFEST_FILE} under the key in {KEY_ENV} (tampered with, "
                               "or signed with another key)")
