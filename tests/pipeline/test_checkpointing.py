"""The Checkpointer on its own: pruning that keeps what it just wrote, corrupt files set aside, read errors refused."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest
import torch

from streamssl.pipeline import checkpointing
from streamssl.pipeline.checkpointing import Checkpointer, NoReadableCheckpoint
from streamssl.pipeline.rundir import RunDirError


def _save(checkpoints: Checkpointer, step: int) -> None:
    checkpoints.save({"step": step, "weights": torch.full((3,), float(step))}, step)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_only_corrupt_checkpoints_raise_and_stay_as_they_are(tmp_path: Path) -> None:
    (tmp_path / "ckpt-000000005.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(NoReadableCheckpoint, match=r"none of the 1 checkpoint\(s\) .* \(the newest, ckpt-000000005.pt: "):
        Checkpointer(tmp_path).load_latest()
    assert (tmp_path / "ckpt-000000005.pt").read_bytes() == b"not a checkpoint"


def test_the_checkpoint_just_written_is_kept_whatever_its_step(tmp_path: Path) -> None:
    for step in (4, 8, 12):
        (tmp_path / f"ckpt-{step:09d}.pt").write_bytes(b"corrupt")
    checkpoints = Checkpointer(tmp_path, keep=3)
    with pytest.raises(NoReadableCheckpoint):
        checkpoints.load_latest()
    _save(checkpoints, 3)  # a run that started over: its step is below the corrupt ones'
    assert _names(tmp_path) == ["ckpt-000000003.pt", "ckpt-000000004.pt.unreadable", "ckpt-000000008.pt.unreadable",
                                "ckpt-000000012.pt.unreadable"]
    state, path = checkpoints.load_latest()
    assert (state["step"], path.name) == (3, "ckpt-000000003.pt")


def test_a_corrupt_newest_checkpoint_does_not_crowd_out_the_readable_ones(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    checkpoints = Checkpointer(tmp_path, keep=2)
    _save(checkpoints, 2)
    (tmp_path / "ckpt-000000009.pt").write_bytes(b"corrupt")
    with caplog.at_level(logging.WARNING):
        found = checkpoints.load_latest()
    assert found is not None and found[0]["step"] == 2
    assert any("ckpt-000000009.pt is unreadable" in r.getMessage() for r in caplog.records)
    for step in (3, 4):
        _save(checkpoints, step)
    # before, the corrupt step 9 counted as one of the two kept: ckpt-2, then ckpt-3 were deleted next to it
    assert _names(tmp_path) == ["ckpt-000000003.pt", "ckpt-000000004.pt", "ckpt-000000009.pt.unreadable"]


def test_a_read_error_is_retried_and_then_refused_not_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Fault injection: EIO needs a failing block device, which this container cannot make (no device-mapper);
    # a real permission error is tested through the CLI in test_run_dir_faults.py.
    checkpoints = Checkpointer(tmp_path)
    for step in (2, 4):
        _save(checkpoints, step)
    monkeypatch.setattr(checkpointing, "READ_RETRY_SECONDS", 0.01)
    real_read, failures = Path.read_bytes, {"left": 2}

    def flaky_read(path: Path) -> bytes:
        if path.name == "ckpt-000000004.pt" and failures["left"]:
            failures["left"] -= 1
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_read(path)

    monkeypatch.setattr(Path, "read_bytes", flaky_read)
    state, path = checkpoints.load_latest()  # two failed reads, the third succeeds
    assert (state["step"], path.name) == (4, "ckpt-000000004.pt")
    failures["left"] = checkpointing.READ_TRIES
    with pytest.raises(RunDirError, match=r"cannot read checkpoint .*ckpt-000000004.pt \(Input/output error; 3 tries\)"):
        checkpoints.load_latest()
    assert _names(tmp_path) == ["ckpt-000000002.pt", "ckpt-000000004.pt"]
