"""`streamssl run` on a run dir that cannot be used as it is: one line and a non-zero exit, nothing trained lost.

Each fault is real: corrupt files, a second trainer, a full disk (tmpfs, or a file-size limit), permissions
(for root, applied by dropping the capabilities that override them; see tests/pipeline/faults.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import tiny_sets
from tests.pipeline.faults import permission_checked, small_disk

FIXTURE = Path(__file__).parents[1] / "fixtures" / "image-rotation-v1-ckpt-000000002.pt"


def _cli(cwd: Path, run_dir: Path, *sets: str, prefix: list[str] | None = None,
         preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    args = [f"--set={item}" for item in tiny_sets(run_dir, Path("lake"), *sets)]
    return subprocess.run([*(prefix or []), sys.executable, "-m", "streamssl.pipeline.cli", "run", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, preexec_fn=preexec_fn,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _one_error_line(result: subprocess.CompletedProcess[str], *, alone: bool = True) -> str:
    """The one `streamssl: error:` line, last on stderr (`alone`: the only line; a refusal at the start)."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in lines if line.startswith("streamssl: error: ")]
    assert errors == lines[-1:] and (len(lines) == 1 or not alone), result.stderr
    return errors[0]


def _fixture_run_dir(tmp_path: Path, small_lake: Path, run_dir: Path) -> Path:
    """A run dir holding the rotation fixture's checkpoint of step 2 (its lake is the relative path "lake")."""
    (tmp_path / "lake").symlink_to(small_lake)
    (run_dir / "checkpoints").mkdir(parents=True)
    return Path(shutil.copy(FIXTURE, run_dir / "checkpoints" / "ckpt-000000002.pt"))


ROTATION = ("method=rotation", "optim.momentum=0")  # the settings the fixture was written with


def test_a_run_dir_whose_checkpoints_all_fail_to_load_is_refused(tmp_path: Path, small_lake: Path) -> None:
    # The old loop warned three times, started fresh, pruned its own new checkpoint and published over the trained one.
    (tmp_path / "lake").symlink_to(small_lake)
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    corrupt = {folder / f"ckpt-{step:09d}.pt": os.urandom(5000) for step in (4, 8, 12)}
    for path, data in corrupt.items():
        path.write_bytes(data)
    result = _cli(tmp_path, tmp_path / "run", "train.max_steps=3")
    line = _one_error_line(result)
    assert result.returncode == 2
    assert "none of the 3 checkpoint(s)" in line and "ckpt-000000012.pt" in line and "checkpoint.allow_fresh=true" in line
    assert {p: p.read_bytes() for p in folder.iterdir()} == corrupt  # nothing written, pruned or set aside
    assert not (tmp_path / "run" / "published").exists()


def test_a_second_run_on_the_same_run_dir_is_refused(tmp_path: Path, small_lake: Path) -> None:
    (tmp_path / "lake").symlink_to(small_lake)
    run_dir = tmp_path / "run"
    args = [f"--set={item}" for item in tiny_sets(run_dir, Path("lake"), "train.max_minutes=2")]
    first = subprocess.Popen([sys.executable, "-m", "streamssl.pipeline.cli", "run", *args], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock, deadline = run_dir / "run.lock", time.monotonic() + 60
        while not (lock.is_file() and lock.read_text().startswith(f"pid {first.pid} ")):  # the first holds the lock
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not take the lock"
            time.sleep(0.2)
        second = _cli(tmp_path, run_dir, "train.max_steps=2")
        line = _one_error_line(second)
        assert second.returncode == 2 and f"run dir {run_dir} is in use by another run (pid {first.pid} on " in line
        assert "resumed from" not in second.stderr and first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        _, errors = first.communicate(timeout=60)
    assert first.returncode == 0, errors  # the first run finished undisturbed


def test_a_full_disk_while_checkpointing_stops_with_one_line(tmp_path: Path, small_lake: Path) -> None:
    disk = tmp_path / "disk"
    # 3 MB: the step-2 checkpoint (1.6 MB) and a 1 MB stale temp fit, a second checkpoint does not; a 1 MB file limit
    with small_disk(disk, 3 * 1024 * 1024, 1024 * 1024) as preexec_fn:
        previous = _fixture_run_dir(tmp_path, small_lake, disk / "run")
        before = previous.read_bytes()
        # step 2 counts as published (a manifest is all `latest_step` reads), else the start would publish it first
        # (a stop that could not publish is caught up at the next start) and the disk would fill there
        (disk / "run" / "published" / "v000001").mkdir(parents=True)
        (disk / "run" / "published" / "v000001" / "manifest.json").write_text('{"step": 2}')
        (disk / "run" / "published" / "latest").symlink_to("v000001")
        stale = previous.parent / ".ckpt-000000003.pt.x1y2z3.tmp"  # what a writer killed mid-write leaves
        stale.write_bytes(b"\0" * 1024 * 1024)
        result = _cli(tmp_path, disk / "run", *ROTATION, "train.max_steps=4", preexec_fn=preexec_fn)
        line = _one_error_line(result, alone=False)  # after the log lines of a resumed run
        reason = "File too large" if preexec_fn else "No space left on device"
        assert f"cannot write a checkpoint to {disk / 'run' / 'checkpoints'} ({reason})" in line
        assert "stopped at step 4, the checkpoint of step 2 is intact" in line
        assert sorted(p.name for p in previous.parent.iterdir()) == ["ckpt-000000002.pt"]  # stale temp gone, no new one
        assert previous.read_bytes() == before
        assert os.readlink(disk / "run" / "published" / "latest") == "v000001"  # nothing published past the last checkpoint


def test_a_read_only_run_dir_is_one_line(tmp_path: Path, small_lake: Path) -> None:
    prefix = permission_checked()
    previous = _fixture_run_dir(tmp_path, small_lake, tmp_path / "run")
    before = previous.read_bytes()
    for folder in (tmp_path / "run", previous.parent):
        folder.chmod(0o555)
    try:
        result = _cli(tmp_path, tmp_path / "run", *ROTATION, "train.max_steps=4", prefix=prefix)
    finally:
        for folder in (tmp_path / "run", previous.parent):
            folder.chmod(0o755)
    line = _one_error_line(result)
    assert result.returncode == 2 and f"run dir {tmp_path / 'run'} is not writable (Permission denied)" in line
    assert previous.read_bytes() == before


def test_an_unreadable_newest_checkpoint_is_refused_not_skipped(tmp_path: Path, small_lake: Path) -> None:
    prefix = permission_checked()
    _fixture_run_dir(tmp_path, small_lake, tmp_path / "run")
    newest = tmp_path / "run" / "checkpoints" / "ckpt-000000004.pt"
    shutil.copy(FIXTURE, newest)
    newest.chmod(0)
    result = _cli(tmp_path, tmp_path / "run", *ROTATION, "train.max_steps=4", prefix=prefix)
    line = _one_error_line(result)
    assert result.returncode == 2 and f"cannot read checkpoint {newest} (Permission denied; 3 tries)" in line
    assert sorted(p.name for p in newest.parent.iterdir()) == ["ckpt-000000002.pt", "ckpt-000000004.pt"]
