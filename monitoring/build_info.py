"""What a run was built from: the streamssl and torch versions and, for a git checkout, its commit."""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path

# The folder holding monitoring/, models/, …: the repository root of a source checkout (editable install);
# site-packages/streamssl for an installed wheel, which has no .git of its own.
SOURCE_ROOT = Path(__file__).resolve().parent.parent


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


@functools.cache
def git_sha(root: Path = SOURCE_ROOT) -> str:
    """The commit checked out at `root`, or "" where it is not a git checkout (or git is missing)."""
    if not (root / ".git").exists():  # a wheel inside someone's repository must not report that repository's commit
        return ""
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def build_labels() -> dict[str, str]:
    """The labels of `streamssl_build_info`."""
    return {"version": package_version("streamssl"), "git_sha": git_sha(), "torch": package_version("torch")}
