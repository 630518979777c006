"""The loop and its run dir: the lock, checkpoints that all fail to load, the publish lineage, stale temp files.

Around the small real task of tests/pipeline/test_loop.py; every job (images, series, forecast) runs this loop.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from streamssl.pipeline.loop import Loop
from streamssl.pipeline.rundir import RunDirError, RunDirLock
from tests.pipeline.test_loop import LinearTask, checkpoints, config


def _corrupt_all(run_dir: Path) -> dict[Path, bytes]:
    corrupted = {}
    for path in (run_dir / "checkpoints").glob("ckpt-*.pt"):
        path.write_bytes(path.read_bytes()[:500])  # truncated, as by a failing disk
        corrupted[path] = path.read_bytes()
    return corrupted


def _published_step(run_dir: Path) -> int:
    return json.loads((run_dir / "published" / "latest" / "manifest.json").read_text())["step"]


def test_checkpoints_that_all_fail_to_load_stop_the_run(tmp_path: Path) -> None:
    Loop(config(tmp_path, "train.max_steps=12"), LinearTask()).run()  # checkpoints at 3, 6, 9, 12, three kept
    corrupted = _corrupt_all(tmp_path)
    task = LinearTask()
    with pytest.raises(RunDirError, match=r"none of the 3 checkpoint\(s\) .* loads .*checkpoint.allow_fresh=true"):
        Loop(config(tmp_path, "train.max_steps=3"), task).run()
    assert not hasattr(task, "feed")  # never opened: nothing trained, no offsets committed
    assert {path: path.read_bytes() for path in (tmp_path / "checkpoints").iterdir()} == corrupted
    assert _published_step(tmp_path) == 12


def test_allow_fresh_starts_over_keeps_its_checkpoint_and_never_publishes_over_the_trained_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    Loop(config(tmp_path, "train.max_steps=12"), LinearTask()).run()
    _corrupt_all(tmp_path)
    versions = sorted(p.name for p in (tmp_path / "published").glob("v*"))
    with caplog.at_level(logging.WARNING):
        state = Loop(config(tmp_path, "train.max_steps=3", "checkpoint.allow_fresh=true"), LinearTask()).run()
    assert state.step == 3
    # the new lineage's checkpoint is kept (the old pruning kept the highest steps: the unreadable ones)
    assert checkpoints(tmp_path) == ["ckpt-000000003.pt"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.unreadable")) == [
        "ckpt-000000006.pt.unreadable", "ckpt-000000009.pt.unreadable", "ckpt-000000012.pt.unreadable"]
    assert sorted(p.name for p in (tmp_path / "published").glob("v*")) == versions and _published_step(tmp_path) == 12
    assert any("not published: step 3 is below step 12" in r.getMessage() for r in caplog.records)
    again = Loop(config(tmp_path, "train.max_steps=6"), LinearTask())
    assert again.resume() and again.state.step == 3  # the next start resumes the new lineage


def test_a_run_dir_in_use_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    holder = RunDirLock(tmp_path / "run.lock")
    holder.acquire()
    try:
        with pytest.raises(RunDirError, match=f"run dir {tmp_path} is in use by another run"):
            Loop(config(tmp_path, "train.max_steps=3"), LinearTask()).run()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["run.lock"]
    finally:
        holder.release()
    loop = Loop(config(tmp_path, "train.max_steps=3"), LinearTask())
    assert loop.run().step == 3
    loop.lock.acquire()  # released when the run ended
    loop.lock.release()


def test_stale_temp_files_are_removed_at_the_start(tmp_path: Path) -> None:
    Loop(config(tmp_path, "train.max_steps=3"), LinearTask()).run()
    stale = [tmp_path / "checkpoints" / ".ckpt-000000006.pt.k2j3h4.tmp", tmp_path / "published" / ".latest.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 1000)
    (tmp_path / "published" / ".v000002.tmp").mkdir()
    (tmp_path / "published" / ".v000002.tmp" / "encoder.safetensors").write_bytes(b"\0" * 1000)
    Loop(config(tmp_path, "train.max_steps=3"), LinearTask()).run()
    assert not [p for p in tmp_path.rglob("*.tmp")]
    assert checkpoints(tmp_path) == ["ckpt-000000003.pt"]
