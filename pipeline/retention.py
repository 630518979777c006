"""Retention of published versions and candidates, so that RUN_DIR/published/ stays bounded on a run with no end.

Called after `latest` and LATEST have moved to the new version. Kept: the newest `keep` versions, every
`keep_every`-th version, whatever `latest` or LATEST points at, and the version just before (a consumer that
resolved `latest` a moment before the flip may still be reading it). The rest go oldest first, each renamed to
a hidden name before it is removed, so no half-deleted folder ever looks like a version.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from pathlib import Path

from streamssl.streams.files import fsync_dir

log = logging.getLogger(__name__)

VERSION = re.compile(r"^v(\d{6})$")


def versions(directory: Path) -> list[int]:
    """The published version numbers in `directory`, ascending."""
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for path in directory.iterdir() if (m := VERSION.match(path.name)))


def pointed_at(directory: Path) -> set[str]:
    """The version names `latest` and LATEST point at (either may be missing)."""
    names = set()
    link = directory / "latest"
    if link.is_symlink():
        names.add(os.readlink(link))
    with contextlib.suppress(OSError):
        names.add((directory / "LATEST").read_text().strip())
    return names


def prune_versions(directory: Path, keep: int, keep_every: int = 0) -> list[str]:
    """Removes the versions retention does not keep (none with `keep` 0); returns their names, oldest first."""
    numbers = versions(directory)
    if not keep or len(numbers) <= keep:
        return []
    protected = pointed_at(directory)
    kept = set(numbers[-keep:]) | {numbers[-2]}  # the newest, and the one a consumer may be swapping from
    doomed = [f"v{number:06d}" for number in numbers if number not in kept and not (keep_every and number % keep_every == 0)]
    return _remove(directory, [name for name in doomed if name not in protected])


def prune_candidates(directory: Path, keep: int) -> list[str]:
    """Keeps the newest `keep` candidate folders (their names sort by step); returns the names removed."""
    if not directory.is_dir():
        return []
    names = sorted(path.name for path in directory.iterdir() if path.is_dir() and not path.name.startswith("."))
    return _remove(directory, names[:max(len(names) - keep, 0)])


def _remove(directory: Path, names: list[str]) -> list[str]:
    for stale in directory.glob(".*.deleting"):  # a removal a crash interrupted
        shutil.rmtree(stale, ignore_errors=True)
    removed = []
    for name in names:
        doomed = directory / f".{name}.deleting"
        try:
            os.replace(directory / name, doomed)
        except OSError as err:
            log.warning("retention: cannot remove %s (%s); it stays", directory / name, err.strerror)
            continue
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(name)
    if removed:
        fsync_dir(directory)
    return removed
