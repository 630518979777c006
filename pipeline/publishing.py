"""Publishing: encoder-only artifacts in RUN_DIR/published/vNNNNNN/, with an atomic `latest` pointer.

A version is written into a hidden temp folder and renamed into place, then `latest` (a relative
symlink) is replaced with os.replace, so a consumer never sees a half-written version or a
dangling pointer. `streamssl.models.load_encoder` reads it back without any training code.

Beside the link, the text file LATEST names the same version folder (object stores have no symlinks); it is
written after the link, atomically and durably. An encoder the gate (pipeline/publish_gate.py) refuses is kept
under candidates/ instead, written the same way but never pointed at.

A version never goes out over a newer lineage: one whose step is below that of the version `latest` points
at (a run restarted from scratch or from an older checkpoint) is refused, and `latest` keeps the better one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from torch import nn

from streamssl.models.artifacts import Artifact
from streamssl.models.encoder_io import Manifest, save_encoder
from streamssl.pipeline.retention import versions
from streamssl.streams.files import atomic_write, fsync_dir

LATEST_FILE = "LATEST"
CANDIDATES = "candidates"


class OlderThanLatest(Exception):
    """The encoder to publish was trained for fewer steps than the one `latest` points at."""


class Publisher:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def latest_version(self) -> int:
        return max(versions(self.directory), default=0)

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
        version = self.latest_version() + 1
        name = f"v{version:06d}"
        self._write(self.directory, name, backbone, replace(manifest, version=version), artifacts)
        link = self.directory / ".latest.tmp"
        link.unlink(missing_ok=True)
        link.symlink_to(name)
        os.replace(link, self.directory / "latest")
        fsync_dir(self.directory)
        if (self.directory / LATEST_FILE).is_symlink():  # a case-folding file system: LATEST *is* `latest`
            return version, self.directory / name
        with atomic_write(self.directory / LATEST_FILE) as handle:  # after the link: both name a complete version
            handle.write(f"{name}\n".encode())
        return version, self.directory / name

    def keep_candidate(self, backbone: nn.Module, manifest: Manifest, reason: str) -> Path:
        """Writes a refused encoder to candidates/stepNNNNNNNNN-REASON (replacing one of the same name); its folder."""
        folder = self.directory / CANDIDATES
        name = f"step{manifest.step:09d}-{reason}"
        self._write(folder, name, backbone, manifest)
        return folder / name

    @staticmethod
    def _write(directory: Path, name: str, backbone: nn.Module, manifest: Manifest,
               artifacts: Sequence[Artifact] = ()) -> None:
        """`backbone`, `artifacts` and `manifest` as directory/name, durable before it appears there (a crash never
        publishes empty files); a folder of that name is replaced."""
        directory.mkdir(parents=True, exist_ok=True)
        temp = directory / f".{name}.tmp"
        shutil.rmtree(temp, ignore_errors=True)
        try:
            temp.mkdir()
            save_encoder(temp, backbone, replace(manifest, created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
                         artifacts)
            for file in temp.iterdir():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
            fsync_dir(temp)
            if (directory / name).exists():  # only a candidate of the same step: versions are numbered up
                os.replace(directory / name, directory / f".{name}.old.tmp")
                shutil.rmtree(directory / f".{name}.old.tmp", ignore_errors=True)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        os.replace(temp, directory / name)
