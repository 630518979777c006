"""Publishing: encoder-only artifacts in RUN_DIR/published/vNNNNNN/, with an atomic `latest` pointer.

A version is written into a hidden temp folder and renamed into place, then `latest` (a relative
symlink) is replaced with os.replace, so a consumer never sees a half-written version or a
dangling pointer. `streamssl.models.load_encoder` reads it back without any training code.

A version never goes out over a newer lineage: one whose step is below that of the version `latest` points
at (a run restarted from scratch or from an older checkpoint) is refused, and `latest` keeps the better one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from torch import nn

from streamssl.models.artifacts import Artifact
from streamssl.models.encoder_io import Manifest, save_encoder
from streamssl.streams.files import fsync_dir

_VERSION = re.compile(r"^v(\d{6})$")


class OlderThanLatest(Exception):
    """The encoder to publish was trained for fewer steps than the one `latest` points at."""


class Publisher:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def latest_version(self) -> int:
        if not self.directory.is_dir():
            return 0
        versions = [int(m.group(1)) for p in self.directory.iterdir() if (m := _VERSION.match(p.name))]
        return max(versions, default=0)

    def latest_step(self) -> int:
        """Training step of the version `latest` points at; -1 if nothing is published yet."""
        manifest = self.directory / "latest" / "manifest.json"
        return int(json.loads(manifest.read_text())["step"]) if manifest.is_file() else -1

    def publish(self, backbone: nn.Module, manifest: Manifest, artifacts: Sequence[Artifact] = ()) -> tuple[int, Path]:
        """Writes the next version (with `artifacts`: see `save_encoder`) and points `latest` at it; returns
        (version, folder).

        Raises:
            OlderThanLatest: `manifest.step` is below the step of the version `latest` points at.
            OSError: Writing failed (a full disk); `latest` and the versions before are as they were.
        """
        latest_step = self.latest_step()
        if manifest.step < latest_step:
            raise OlderThanLatest(f"step {manifest.step} is below step {latest_step} of {self.directory / 'latest'}")
        self.directory.mkdir(parents=True, exist_ok=True)
        version = self.latest_version() + 1
        name = f"v{version:06d}"
        temp = self.directory / f".{name}.tmp"
        shutil.rmtree(temp, ignore_errors=True)
        try:
            temp.mkdir()
            save_encoder(temp, backbone, replace(manifest, version=version,
                                                 created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
                         artifacts)
            for file in temp.iterdir():  # durable before it becomes visible: a crash never publishes empty files
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
            fsync_dir(temp)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        os.replace(temp, self.directory / name)
        link = self.directory / ".latest.tmp"
        link.unlink(missing_ok=True)
        link.symlink_to(name)
        os.replace(link, self.directory / "latest")
        fsync_dir(self.directory)
        return version, self.directory / name
