"""Rolling checkpoints: atomic write (temp name, fsync, rename, fsync dir), keep the last K.

A checkpoint is one dict of tensors and plain Python values, loadable with
`torch.load(weights_only=True)`: no pickled classes, so an old checkpoint never executes code.
If the newest file is truncated or corrupt, loading warns and falls back to the one before.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from streamssl.streams.files import atomic_write

log = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")


class Checkpointer:
    def __init__(self, directory: Path, keep: int = 3) -> None:
        self.directory = Path(directory)
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)

    def paths(self) -> list[Path]:
        """Complete checkpoints, oldest first (temp files never match the name pattern)."""
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def save(self, state: dict[str, Any], step: int) -> Path:
        final = self.directory / f"ckpt-{step:09d}.pt"
        with atomic_write(final) as handle:
            torch.save(state, handle)
        for old in self.paths()[:-self.keep]:
            old.unlink(missing_ok=True)
        return final

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint that loads; None for a fresh run dir."""
        for path in reversed(self.paths()):
            try:
                state = torch.load(path, map_location=map_location, weights_only=True)
            except Exception as err:  # truncated zip, bad pickle, I/O error: all mean "unusable"
                log.warning("checkpoint %s is unreadable (%s); falling back to the previous one",
                            path.name, str(err).splitlines()[0] if str(err) else type(err).__name__)
                continue
            if not isinstance(state, dict) or "step" not in state:
                log.warning("checkpoint %s has no step; falling back to the previous one", path.name)
                continue
            return state, path
        return None
