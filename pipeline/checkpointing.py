"""Rolling checkpoints: atomic write (temp name, fsync, rename, fsync dir), keep the last K.

A checkpoint is one dict of tensors and plain Python values, loadable with
`torch.load(weights_only=True)`: no pickled classes, so an old checkpoint never executes code.

Loading tells a corrupt file (its bytes do not parse) from one that cannot be read (an I/O or permission
error, possibly transient). A corrupt newest file is skipped for the one before, and set aside as
`*.unreadable` at the next save, so that it neither shadows nor crowds out the readable ones; if none
loads, `NoReadableCheckpoint`. A file that cannot be read is retried, then refused: falling back to an
older checkpoint because of a passing I/O error would silently drop the newest training.
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, BinaryIO, cast

import torch

from streamssl.pipeline.rundir import RunDirError
from streamssl.streams.files import atomic_write

log = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")
READ_TRIES = 3  # reads of a checkpoint that fails with an I/O error before refusing
READ_RETRY_SECONDS = 0.5  # wait before the second try; doubles after each


class NoReadableCheckpoint(RunDirError):
    """Checkpoints exist, and every one of them is corrupt."""


class _Writes:
    """A handle that keeps the OSError of a failed write: torch.save reports one (a full disk) as a RuntimeError
    without its errno."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.handle.flush()


def _first_sentence(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return text.split(". ")[0]  # torch appends several sentences of advice to "failed reading zip archive"


class Checkpointer:
    def __init__(self, directory: Path, keep: int = 3) -> None:
        self.directory = Path(directory)
        self.keep = keep
        self.corrupt: dict[Path, str] = {}  # files found corrupt by load_latest -> why

    def paths(self) -> list[Path]:
        """Complete checkpoints, oldest first (temp files never match the name pattern)."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Writes `state` as the checkpoint of `step`; an OSError (a full disk) leaves the previous ones as they were."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.set_aside_corrupt()
        final = self.directory / f"ckpt-{step:09d}.pt"
        with atomic_write(final) as handle:
            writes = _Writes(handle)
            try:
                torch.save(state, cast(BinaryIO, writes))  # torch needs only write and flush
            except RuntimeError:
                if writes.error is not None:
                    raise writes.error from None
                raise
        self.prune(kept=final)
        return final

    def prune(self, kept: Path) -> None:
        """Keeps `kept` (the checkpoint just written, whatever its step) and the newest `keep - 1` others."""
        others = [p for p in self.paths() if p != kept]
        for old in others[:max(len(others) - (self.keep - 1), 0)]:
            old.unlink(missing_ok=True)

    def set_aside_corrupt(self) -> None:
        """Renames the files load_latest found corrupt to `*.unreadable`: kept for a post-mortem, never loaded again."""
        for path, why in self.corrupt.items():
            if path.exists():
                os.replace(path, path.with_name(path.name + ".unreadable"))
                log.warning("set aside the corrupt checkpoint %s as %s.unreadable (%s)", path.name, path.name, why)
        self.corrupt.clear()

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint that loads; None for a run dir without checkpoints.

        Raises:
            NoReadableCheckpoint: There are checkpoints, and none of them loads.
            RunDirError: A checkpoint could not be read (I/O or permission error) in READ_TRIES tries.
        """
        paths = self.paths()
        skipped: list[tuple[Path, str]] = []
        for path in reversed(paths):
            data = self._read(path)
            if data is None:
                continue  # gone since the listing
            try:
                state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
                why = "" if isinstance(state, dict) and "step" in state else "it has no step"
            except Exception as err:  # truncated zip, bad pickle, a class weights_only refuses: all mean "corrupt"
                why = _first_sentence(err)
            if why:
                skipped.append((path, why))
                continue
            for bad, reason in skipped:
                log.warning("checkpoint %s is unreadable (%s); falling back to the previous one", bad.name, reason)
            self.corrupt.update(skipped)
            return state, path
        if not skipped:
            return None
        self.corrupt.update(skipped)
        newest, why = skipped[0]
        raise NoReadableCheckpoint(f"none of the {len(skipped)} checkpoint(s) in {self.directory} loads "
                                   f"(the newest, {newest.name}: {why})")

    def _read(self, path: Path) -> bytes | None:
        """The file's bytes (None if it is gone), read apart from parsing: an OSError here is never corruption."""
        wait, errors = READ_RETRY_SECONDS, list[str]()
        while True:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                return None
            except OSError as err:
                errors.append(err.strerror or type(err).__name__)
                if len(errors) == READ_TRIES:
                    raise RunDirError(f"cannot read checkpoint {path} ({errors[-1]}; {READ_TRIES} tries); refusing to "
                                      "resume from an older one in its place: fix the storage or the permissions, "
                                      "then start again") from None
                time.sleep(wait)
                wait *= 2
                continue
            if errors:
                log.warning("read checkpoint %s on try %d (before: %s)", path.name, len(errors) + 1, "; ".join(errors))
            return data
