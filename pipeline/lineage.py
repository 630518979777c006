"""What a published version says about where it came from, and what it carries besides its weights.

`lineage(loop)` is the manifest's `lineage`: the stream range its weights were trained on (the position right
after the first message trained on, and after the last one handled), samples and steps, the redacted config with
its digest, the code (streamssl, torch, Python, the git commit where the code runs from a checkout) and the run
dir's name. In a `--workers N` run the positions are rank 0's (the one that publishes). `artifacts(cfg)` are the
files a publish adds: the ONNX export (where `publish.onnx` is on) and the model card.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from streamssl.models.artifacts import Artifact
from streamssl.models.model_card import write_model_card
from streamssl.models.onnx_export import export_onnx, onnx_skipped
from streamssl.pipeline.config import Config, redacted
from streamssl.pipeline.loading.positions import Position, position_to_dict

if TYPE_CHECKING:
    from streamssl.pipeline.loop import Loop


def lineage(loop: Loop) -> dict[str, Any]:
    state, config = loop.state, redacted(loop.cfg)
    return {"first_position": stream_position(state.first_position), "last_position": stream_position(state.position),
            "samples_seen": state.samples_seen, "step": state.step, "workers": loop.collective.world_size,
            "config_digest": config_digest(config), "config": config, "run_dir": loop.paths.root.name,
            **code_versions()}


def stream_position(position: Position | None) -> dict[str, Any]:
    """A position as a lineage shows it: its checkpointed form ({} before anything was read), less what is
    resume state rather than place: a shard stream's shuffle buffer (records, their bytes included) and RNG become
    the count of buffered records, and its pass order (one name per shard of the lake) the count of shards."""
    state = position_to_dict(position)
    if "buffer" not in state:
        return state
    place = {name: value for name, value in state.items() if name not in ("buffer", "rng", "order")}
    return {**place, "buffered_records": len(state["buffer"]), "pass_shards": len(state["order"])}


def config_digest(config: dict[str, Any]) -> str:
    """sha256 of the config as canonical JSON (sorted keys, no spaces): recomputable from the manifest's copy."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@functools.cache  # the code that runs does not change while it runs
def code_versions() -> dict[str, Any]:
    versions: dict[str, Any] = {"torch_version": torch.__version__, "python_version": platform.python_version()}
    # absent where the source tree runs without being installed
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        versions["streamssl_version"] = importlib.metadata.version("streamssl")
    return {**versions, **_git_revision(Path(__file__).resolve().with_name("__init__.py"))}


def _git_revision(source: Path) -> dict[str, Any]:
    """{"git_sha", "git_dirty"} where `source` is a file tracked in a git checkout; {} otherwise (an installed
    package, even one inside some repository's virtualenv, is not tracked; no git at all)."""
    # GIT_OPTIONAL_LOCKS=0: `git status` must not write the index of a checkout it only reads
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", str(source.parent), *args], capture_output=True, text=True, timeout=10,
                              env=env, check=False)

    try:
        if git("ls-files", "--error-unmatch", source.name).returncode != 0:
            return {}
        sha, status = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if sha.returncode != 0:
        return {}
    return {"git_sha": sha.stdout.strip(), "git_dirty": bool(status.stdout.strip())}


def artifacts(cfg: Config) -> tuple[Artifact, ...]:
    """What a publish writes next to the weights, in order: the model card comes last, as it lists the others."""
    onnx = export_onnx if cfg.publish.onnx else onnx_skipped("not exported: publish.onnx is false")
    return onnx, write_model_card
