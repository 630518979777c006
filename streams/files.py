"""Paths of a run dir and atomic file writes: the one leaf module every package may import (stdlib only).

A reader must see a file whole or not at all, even across a crash or power loss: write a temp file in the
same folder (a rename is atomic only within one file system), fsync it, rename it into place, fsync the
folder (POSIX: the new directory entry needs its own fsync). Temp names start with '.' and end in '.tmp',
which no reader's listing matches.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    """Makes a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path, *, durable: bool = True) -> Iterator[BinaryIO]:
    """A binary handle whose bytes become `path` when the block ends without an error; nothing otherwise.

    `durable=False` skips both fsyncs (a cache that may be lost, never half-written).
    """
    path = Path(path)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    if durable:
        fsync_dir(path.parent)


def remove_stale_temps(folder: Path) -> list[str]:
    """Removes the temp files and folders a killed writer left in `folder` (only safe while no writer runs there).

    Returns their names.
    """
    if not folder.is_dir():
        return []
    stale = sorted(p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return [p.name for p in stale]


@dataclass(frozen=True)
class RunPaths:
    """Where a run keeps what it writes, under its run dir."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))  # a str run dir works too

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"  # the resolved config the run started with

    @property
    def lock(self) -> Path:
        return self.root / "run.lock"  # held by the one run using the run dir (pipeline/rundir.py)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def published(self) -> Path:
        return self.root / "published"  # vNNNNNN/ encoder versions and the `latest` link

    @property
    def dead_letters(self) -> Path:
        return self.root / "dead-letter.jsonl"

    @property
    def history(self) -> Path:
        return self.root / "metrics.jsonl"  # progress, eval and publish lines (pipeline/history.py)

    @property
    def trained_keys(self) -> Path:
        return self.root / "trained-keys.jsonl"  # train.audit_keys: which records went into which step

    @property
    def workers(self) -> Path:
        return self.root / "workers"  # rank-N.json summaries of a multi-worker run
