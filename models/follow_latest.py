"""Serving the newest published encoder: `LatestEncoder` follows a published/ folder and hot-swaps what it serves.

A thread polls the folder's LATEST file (the version's folder name; object stores have no symlinks), else its
`latest` link. A new version is loaded and verified with `load_encoder` (manifest checks, every sha256, the HMAC
where STREAMSSL_ENCODER_KEY is set) while `embed` goes on serving the old one; only a verified encoder replaces
it, by one reference swap under a lock, so no call ever sees a half-loaded encoder or fails for a swap. A version
that does not verify is logged, skipped (not tried again) and the old one kept. Only torch and the encoder
loader are needed: no training code.

    encoder = LatestEncoder("runs/default/published", poll_seconds=10)
    embeddings = encoder.embed(images)  # float [B, C, H, W] in [0, 1] -> [B, D]
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from streamssl.models.encoder_folder import EncoderLoadError
from streamssl.models.encoder_io import load_encoder

log = logging.getLogger(__name__)

LATEST_FILE = "LATEST"
LATEST_LINK = "latest"
_NAME = re.compile(r"v\d{6}")
_MAX_LATEST_BYTES = 64  # "v000123\n" with room for stray whitespace


class LatestEncoder:
    """The newest verified encoder in `published_dir`, swapped in without dropping a call.

    Args:
        published_dir: A run's published/ folder (or a copy of it: LATEST and the version folders are enough).
        poll_seconds: How often the thread looks for a new version; 0 = no thread (call `refresh` yourself).
        device: Where encoders are loaded and inputs moved to.
    """

    def __init__(self, published_dir: str | Path, poll_seconds: float = 10.0, device: str = "cpu") -> None:
        self.directory, self.poll_seconds, self.device = Path(published_dir), poll_seconds, device
        self._lock = threading.Lock()  # guards the (encoder, version) pair: swapped together, read together
        self._encoder: nn.Module | None = None
        self._version = ""
        self.skipped: set[str] = set()  # versions that did not verify
        self._stop = threading.Event()
        self.refresh()
        self._thread: threading.Thread | None = None
        if poll_seconds > 0:
            self._thread = threading.Thread(target=self._follow, name="streamssl-follow-latest", daemon=True)
            self._thread.start()

    @property
    def version(self) -> str:
        """The folder name of the version being served ("" before the first one verified)."""
        return self._version

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest of the version being served."""
        with self._lock:
            encoder = self._encoder
        return dict(getattr(encoder, "manifest", {}))

    def latest_name(self) -> str:
        """The version LATEST (else the `latest` link) names; "" when there is none or it is not a version name."""
        try:
            with open(self.directory / LATEST_FILE, "rb") as handle:
                name = handle.read(_MAX_LATEST_BYTES + 1).decode("ascii", "replace").strip()
        except OSError:
            try:
                name = os.readlink(self.directory / LATEST_LINK)
            except OSError:
                return ""
        return name if _NAME.fullmatch(name) else ""

    def refresh(self) -> bool:
        """Loads, verifies and swaps in the version LATEST names if it is new; whether it did."""
        name = self.latest_name()
        if not name or name == self._version or name in self.skipped:
            return False
        try:
            encoder = load_encoder(self.directory / name, self.device)
        except EncoderLoadError as err:
            self.skipped.add(name)
            log.warning("skipped %s (%s); still serving %s", name, err, self._version or "nothing")
            return False
        with self._lock:
            self._encoder, self._version = encoder, name
        log.info("now serving %s", self.directory / name)
        return True

    def embed(self, x: Tensor) -> Tensor:
        """Embeddings of `x` by the encoder being served (the one current when the call began).

        Raises:
            EncoderLoadError: No version has verified yet.
        """
        with self._lock:
            encoder = self._encoder
        if encoder is None:
            raise EncoderLoadError(f"{self.directory}: no verified encoder yet")
        with torch.no_grad():
            return encoder(x.to(self.device))

    def close(self) -> None:
        """Stops following (the encoder being served stays usable)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> LatestEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.refresh()
            except Exception:  # a poll must never end the thread: what is being served stays
                log.exception("following %s", self.directory)
