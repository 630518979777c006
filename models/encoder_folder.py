"""Reading a published encoder folder as untrusted input: every file confined to the folder (no absolute names,
no `..`, no link that leads out of it), a regular file, and bounded in size before it is read."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from streamssl.models.encoder_checks import MAX_WEIGHTS_BYTES

# No following a link swapped in after resolve(); no waiting on a FIFO.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


class EncoderLoadError(Exception):
    """A published encoder folder is missing, incomplete, tampered with or does not fit its backbone."""


def resolve_folder(folder: Path) -> Path:
    """The folder, resolved once (if `latest` flips while we read, we still read one version); a link is
    followed only to a folder inside the link's own directory, as `published/latest` points at `vNNNNNN`."""
    try:
        resolved = folder.resolve()
        if folder.is_symlink():
            home = folder.parent.resolve()
            if resolved == home or not resolved.is_relative_to(home):
                raise EncoderLoadError(f"{folder}: a link to {str(resolved)!r}, outside {home}; only a link "
                                       "to a folder beside it is followed")
    except (OSError, ValueError, RuntimeError) as error:  # ValueError: a NUL byte; RuntimeError: a link loop
        raise EncoderLoadError(f"{folder}: cannot resolve it ({error})") from error
    return resolved


@contextmanager
def open_inside(folder: Path, name: str, limit: int) -> Iterator[BinaryIO]:
    """`name` opened for reading, refused unless it is a regular file of at most `limit` bytes inside `folder`
    (resolved); read errors in the `with` body become EncoderLoadError too."""
    path = folder / name
    try:
        resolved = path.resolve()
        if resolved == folder or not resolved.is_relative_to(folder):
            raise EncoderLoadError(f"{path}: resolves to {str(resolved)!r}, outside the encoder folder")
        with os.fdopen(os.open(resolved, _OPEN_FLAGS), "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise EncoderLoadError(f"{path}: not a regular file")
            if info.st_size > limit:
                raise EncoderLoadError(f"{path}: {info.st_size} bytes, more than the {limit} it may have")
            yield handle
    except OSError as error:
        raise EncoderLoadError(f"{path}: cannot read it ({error.strerror or error})") from error
    except (ValueError, RuntimeError) as error:  # ValueError: a NUL byte; RuntimeError: a link loop
        raise EncoderLoadError(f"{path}: cannot read it ({error})") from error



def read_inside(folder: Path, name: str, limit: int) -> bytes:
    with open_inside(folder, name, limit) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise EncoderLoadError(f"{folder / name}: grew past {limit} bytes while being read")
    return data


def sha256_inside(folder: Path, name: str) -> str:
    """The sha256 of a file other than the weights, read in chunks: nothing loads it, so nothing keeps it."""
    digest, size = hashlib.sha256(), 0
    with open_inside(folder, name, MAX_WEIGHTS_BYTES) as handle:
        while chunk := handle.read(1 << 20):
            size += len(chunk)
            if size > MAX_WEIGHTS_BYTES:
                raise EncoderLoadError(f"{folder / name}: grew past {MAX_WEIGHTS_BYTES} bytes while being read")
            digest.update(chunk)
    return digest.hexdigest()
