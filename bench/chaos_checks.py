"""What a run dir must show after a chaos session: nothing lost, nothing stuck, every file usable.

Each check returns a `Check`: the measured value next to its goal, so that the table prints them side by
side and a failure names what it saw (file names, keys, exit codes) instead of only "failed".
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from streamssl.models.encoder_io import load_encoder


@dataclass
class Check:
    name: str
    measured: str
    goal: str
    ok: bool


def trained_keys(run_dir: Path) -> tuple[Counter[str], int]:
    """How often each record key was trained (the audit trail), and how many lines did not parse (torn writes)."""
    trained: Counter[str] = Counter()
    torn = 0
    path = run_dir / "trained-keys.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    for line in lines:
        try:
            trained.update(json.loads(line)["keys"])
        except (ValueError, KeyError):
            torn += 1
    return trained, torn


def _examples(keys: set[str] | list[str], count: int = 3) -> str:
    return ", ".join(sorted(keys)[:count]) + (" …" if len(keys) > count else "")


def check_records(acknowledged: list[str], trained: Counter[str], torn: int, bound: int, bound_text: str) -> list[Check]:
    """Every acknowledged record trained at least once, nothing else trained, duplicates within the bound."""
    missing = set(acknowledged) - set(trained)
    unknown = set(trained) - set(acknowledged)
    duplicates = sum(count - 1 for count in trained.values())
    trained_text = f"{len(acknowledged) - len(missing)} / {len(acknowledged)}"
    if missing:
        trained_text += f" (missing: {_examples(missing)})"
    if unknown:
        trained_text += f"; {len(unknown)} keys never produced ({_examples(unknown)})"
    return [
        Check("trained ≥ 1", trained_text, "all, nothing else", not missing and not unknown),
        Check("duplicates", f"{duplicates} (max {max(trained.values(), default=0)}× one record)",
              f"≤ {bound_text} = {bound}", duplicates <= bound),
        Check("audit lines torn", str(torn), "0", torn == 0),
    ]


def _step_of(path: Path) -> int:
    return int(path.name[5:14])


def check_checkpoints(run_dir: Path) -> tuple[Check, int]:
    """Every checkpoint file loads with weights_only and has its name's step; returns the newest step too."""
    paths = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))
    bad = []
    for path in paths:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state.get("step") != _step_of(path):
                bad.append(f"{path.name}: step {state.get('step')}")
        except Exception as err:  # any failure to load is the finding
            bad.append(f"{path.name}: {type(err).__name__}: {str(err).splitlines()[0][:100] if str(err) else ''}")
    newest = _step_of(paths[-1]) if paths else -1
    measured = f"{len(paths) - len(bad)} / {len(paths)} (newest step {newest})" + (f"; {'; '.join(bad)}" if bad else "")
    return Check("checkpoints load", measured, "all (torch.load weights_only)", bool(paths) and not bad), newest


def check_published(run_dir: Path, newest_step: int) -> list[Check]:
    """`latest` resolves to a version that load_encoder loads, at most as new as the newest checkpoint; every
    version folder loads too (a half-written one must never be visible under its final name)."""
    published = run_dir / "published"
    latest = published / "latest"
    checks = []
    try:
        target = os.readlink(latest)
        encoder = load_encoder(latest)
        step = int(encoder.manifest["step"])
        checks.append(Check("published latest", f"→ {target}, loads, step {step}", f"loads, step ≤ {newest_step}",
                            step <= newest_step))
    except Exception as err:  # a dangling link, a refused folder: the finding
        checks.append(Check("published latest", f"{type(err).__name__}: {str(err)[:160]}", "loads", False))
    versions = sorted(p for p in published.glob("v*") if p.is_dir()) if published.is_dir() else []
    bad = []
    for version in versions:
        try:
            load_encoder(version)
        except Exception as err:
            bad.append(f"{version.name}: {str(err)[:100]}")
    checks.append(Check("published versions load", f"{len(versions) - len(bad)} / {len(versions)}"
                        + (f"; {'; '.join(bad[:3])}" if bad else ""), "all", not bad))
    return checks


def check_temp_files(run_dir: Path, last_start: float, left_by: dict[str, str]) -> Check:
    """No temp file (or folder) from before the last start left anywhere in the run dir; `left_by` names the
    kill that landed inside each temp file's write."""
    stale = []
    for path in run_dir.rglob("*.tmp"):
        if path.lstat().st_mtime < last_start:
            stale.append(str(path.relative_to(run_dir)) + (f" from {left_by[path.name]}" if path.name in left_by else ""))
    return Check("stale temp files", f"{len(stale)}" + (f" ({_examples(stale, 2)})" if stale else ""),
                 "0 older than the last start", not stale)


def check_exits(exits: list[tuple[int, bool]], orphans: list[int]) -> list[Check]:
    """Every trainer ended by our SIGKILL or with 0, the last one with 0; no loader outlived its trainer."""
    ours = sum(1 for code, killed in exits if killed and code == -signal.SIGKILL)
    clean = sum(1 for code, killed in exits if not killed and code == 0)
    other = [code for code, killed in exits if not (killed and code == -signal.SIGKILL) and not (not killed and code == 0)]
    last_clean = bool(exits) and exits[-1] == (0, False)
    measured = f"{ours} by our kill, {clean} with 0" + (f", other: {other}" if other else "")
    return [Check("trainer exits", measured + ("" if last_clean else "; the last did not exit 0"),
                  "ours or 0, the last 0", not other and last_clean),
            Check("orphaned loaders", f"{len(orphans)}" + (f" (pids {orphans[:3]})" if orphans else ""),
                  "0 alive 10 s after their trainer", not orphans)]


def check_final_step(newest_step: int, steps: int) -> Check:
    return Check("final step", str(newest_step), f"= {steps} (--max-steps)", newest_step == steps)


def check_committed(committed: int, produced: int) -> Check:
    return Check("group committed", str(committed), f"= {produced} (every produced record)", committed == produced)


def checkpoint_value(run_dir: Path, step: int, key: str) -> object:
    """One value of the checkpoint of `step`."""
    state = torch.load(run_dir / "checkpoints" / f"ckpt-{step:09d}.pt", map_location="cpu", weights_only=True)
    return state.get(key)
