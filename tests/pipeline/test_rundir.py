"""The run-dir lock: exclusive, and gone with its holder however the holder ends (kill -9 included)."""

from __future__ import annotations

import multiprocessing
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from streamssl.pipeline.rundir import RunDirError, RunDirLock

HOLD = "import sys, time; from streamssl.pipeline.rundir import RunDirLock; RunDirLock(sys.argv[1]).acquire(); " \
       "print('held', flush=True); time.sleep(60)"


def test_a_lock_held_by_another_process_is_refused_and_freed_by_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "run.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(RunDirError, match=f"is in use by another run \\(pid {holder.pid} on "):
            RunDirLock(path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    lock = RunDirLock(path)
    lock.acquire()  # no stale lock: the kernel dropped it with the killed holder
    lock.release()


def _sleep(started: Any) -> None:
    started.set()
    time.sleep(30)


def test_a_forked_child_does_not_keep_the_lock(tmp_path: Path) -> None:
    # The loader process is forked after the lock is taken; an orphan of a killed trainer must not hold it.
    lock = RunDirLock(tmp_path / "run.lock")
    lock.acquire()
    context = multiprocessing.get_context("fork")
    started = context.Event()
    child = context.Process(target=_sleep, args=(started,), daemon=True)
    child.start()
    try:
        assert started.wait(timeout=30)  # past the fork handlers, which run before the target
        lock.release()
        other = RunDirLock(tmp_path / "run.lock")
        other.acquire()
        other.release()
    finally:
        child.kill()
        child.join()


def test_acquire_can_wait_for_a_holder_that_is_going(tmp_path: Path) -> None:
    # A Ray Train worker group restarted after a failure may start before the killed rank 0 has exited.
    path = tmp_path / "run.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    threading.Timer(0.5, holder.kill).start()
    lock = RunDirLock(path)
    lock.acquire(wait_seconds=30)
    lock.release()
    holder.wait(timeout=10)
