"""Real file-system faults for tests: a full disk and permission checks that bite even when the tests run as root."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_disk(folder: Path, disk_bytes: int, file_bytes: int) -> Iterator[Callable[[], None] | None]:
    """`folder` on a small disk: a tmpfs of `disk_bytes` where this process may mount one (writes fail with ENOSPC),
    else a limit of `file_bytes` on each file a child process writes (EFBIG, RLIMIT_FSIZE). Yields the child's
    `preexec_fn` (None for the tmpfs)."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={disk_bytes}", "tmpfs", str(folder)], capture_output=True).returncode == 0
    if not mounted:
        yield lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
        return
    try:
        yield None
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def permission_checked() -> list[str]:
    """A command prefix under which file permissions apply to the child. Root is not stopped by them, so as root
    the child runs without the capabilities that override them (still uid 0: its interpreter under /root stays
    reachable); skipped where neither works."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: file permissions cannot be made to apply")
    prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    if subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root and cannot drop CAP_DAC_OVERRIDE: file permissions cannot be made to apply")
    return prefix
