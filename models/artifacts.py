"""What a publish writes beside the weights (ONNX, the model card): each is an `Artifact`, run in turn by
`save_encoder` on the version folder being saved, before the manifest lists every file's digest."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from streamssl.models.encoder_io import Manifest

# Writes one more file into a version folder being saved; returns the manifest with it in `files` (`with_file`).
Artifact = Callable[[Path, nn.Module, "Manifest"], "Manifest"]


def with_file(manifest: Manifest, folder: Path, name: str) -> Manifest:
    """`manifest` with `name` (a file just written into `folder`) and its sha256 added to `files`."""
    with open(folder / name, "rb") as handle:
        return replace(manifest, files={**manifest.files, name: hashlib.file_digest(handle, "sha256").hexdigest()})
