"""One run per run dir: an exclusive lock on RUN_DIR/run.lock, held from the start of a run to its end; and what
the holder writes there first (the config, removing stale temp files) and along the way (the audit trail).

Two trainers on one run dir would resume from each other's checkpoints, prune each other's files and publish
over each other. The lock is `flock`: the kernel drops it when the last descriptor of the open file closes,
so any exit of the holder releases it (kill -9 and the OOM killer included) and the file that stays behind
holds nothing. Forked children (the loader process) close their copy at once, so an orphan of a killed
trainer never keeps the run dir locked. The holder's pid, written into the file, only names it in the refusal.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

import yaml

from streamssl.pipeline.config import Config, redacted
from streamssl.pipeline.loading.deadletter import private
from streamssl.streams.files import RunPaths, atomic_write, remove_stale_temps

log = logging.getLogger(__name__)


class RunDirError(Exception):
    """The run dir cannot be used as it is: in use by another run, not writable, no checkpoint that loads.

    The CLI prints it as one line and exits 2.
    """


_HELD: set[int] = set()  # descriptors of the run-dir locks this process holds


def _close_in_child() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunDirLock:
    """The lock of the run dir `path.parent`; `acquire` refuses with a RunDirError if another run holds it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, wait_seconds: float = 0.0) -> None:
        """Takes the lock, waiting up to `wait_seconds` for a holder to go."""
        run_dir = self.path.parent
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise RunDirError(f"run dir {run_dir} is not writable ({err.strerror})") from None
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                os.close(fd)
                raise RunDirError(f"run dir {run_dir} is in use by another run ({holder or 'holder unknown'}); "
                                  "stop that one first, or use another --run-dir") from None
            except OSError as err:  # e.g. ENOLCK: a network file system without locks
                os.close(fd)
                raise RunDirError(f"cannot lock run dir {run_dir} ({err.strerror})") from None
        with contextlib.suppress(OSError):  # only names the holder: a full disk must not stop the run here
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        _HELD.add(fd)

    def release(self) -> None:
        """Drops the lock (closing the descriptor does); the file stays, since removing it would race a new holder."""
        if self._fd is None:
            return
        _HELD.discard(self._fd)
        os.close(self._fd)
        self._fd = None


def create_run_dir(root: Path) -> None:
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)  # it holds record bytes and keys
    except OSError as err:
        raise RunDirError(f"cannot create run dir {root} ({err.strerror})") from None


def prepare_run_dir(paths: RunPaths, cfg: Config) -> None:
    """Rank 0, holding the lock: removes what killed writers left behind, records the config."""
    try:
        for folder in (paths.root, paths.checkpoints, paths.published):
            for name in remove_stale_temps(folder):
                log.info("removed %s, left behind by an interrupted write", folder / name)
        with atomic_write(paths.config) as handle:  # 0600, and without the secrets
            handle.write(yaml.safe_dump(redacted(cfg), sort_keys=False).encode())
    except OSError as err:
        raise RunDirError(f"run dir {paths.root} is not writable ({err.strerror})") from None


def append_audit(path: Path, step: int, keys: list[str]) -> None:
    """Lineage: which records went into which step. Lines after the last checkpoint are replayed after a crash,
    so a key may appear twice; at-least-once delivery means every acknowledged key appears at least once."""
    with open(path, "a", encoding="utf-8", opener=private) as handle:
        handle.write(json.dumps({"step": step, "keys": keys}) + "\n")
