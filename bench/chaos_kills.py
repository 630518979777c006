"""kill -9 at aimed moments: a `streamssl run` subprocess on one run dir, its loader child, a Tansu broker.

`Target` is the trainer under fire: it starts the same command again on the same run dir after each kill
and keeps every exit code. `aim_and_kill` delivers one trainer kill at a moment chosen by its aim, found by
polling the run dir (a checkpoint's temp file, a new checkpoint name, a publish's temp folder): the kill
lands within a few milliseconds of what it aimed at, which on a busy machine is often inside the write, the
rename or the fsync that follows. What each kill saw is kept in `Kill.hit`, so a failure can be traced back.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRAINER_AIMS = ("startup", "random", "checkpoint-write", "checkpoint-renamed", "publish")
# How often an aim looks at the run dir: the kill's latency behind what it saw. A checkpoint's temp file lives for
# its torch.save and fsync (tens of ms here), so this still lands inside; polling faster steals the trainer's cores.
POLL_SECONDS = 0.005
AIM_SECONDS = 90.0  # an aim that saw nothing in this long kills anyway (and says so)
ORPHAN_SECONDS = 10.0  # how long a dead trainer's loader may outlive it
LOADER_REPLACED = "restarting it at the last position"  # the trainer's log line for a loader it replaced
LOADER_REPLACE_SECONDS = 30.0  # how long a loader kill waits for that line before the next kill
# What an aim returns when it killed nothing (the kill is logged, not counted as delivered).
EXITED, NO_STEP, NO_LOADER = "exited before the aim", "no step to aim after", "no loader process found"
INSIDE = "(still there after the kill)"  # what a kill aimed at a temp file adds when it landed inside the write


@dataclass
class Kill:
    number: int
    kind: str  # trainer:<aim>, loader or broker
    step: int  # the newest step the run dir showed when it was delivered
    seconds: float  # since the session began
    hit: str = ""  # what the aim saw when it fired

    @property
    def delivered(self) -> bool:
        return self.hit not in (EXITED, NO_STEP, NO_LOADER)


@dataclass
class Target:
    """The trainer command on one run dir, started again after every kill; `exits` holds (returncode, ours)."""

    command: list[str]
    run_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0  # time.time() of the last start (for the temp-file check)
    started_monotonic: float = 0.0
    starts: int = 0
    exits: list[tuple[int, bool]] = field(default_factory=list)
    orphans: list[int] = field(default_factory=list)  # loader processes still alive ORPHAN_SECONDS after their trainer

    def start(self) -> None:
        self.started_at, self.started_monotonic = time.time(), time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts + 1} at {time.strftime('%H:%M:%S')}\n".encode())
            log.flush()
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1

    @property
    def pid(self) -> int:
        assert self.process is not None, "started first"
        return self.process.pid

    def exited(self) -> bool:
        """True (and the exit recorded) when the trainer ended on its own."""
        assert self.process is not None, "started first"
        code = self.process.poll()
        if code is None:
            return False
        self.exits.append((code, False))
        self.process = None
        return True

    def kill(self) -> None:
        """SIGKILL the trainer, then wait for its loader, which must notice and leave by itself."""
        assert self.process is not None, "started first"
        loaders = loader_pids(self.pid)
        self.process.send_signal(signal.SIGKILL)
        code = self.process.wait()
        self.exits.append((code, code == -signal.SIGKILL))
        self.process = None
        deadline = time.monotonic() + ORPHAN_SECONDS
        while loaders and time.monotonic() < deadline:
            loaders = [pid for pid in loaders if running(pid)]
            time.sleep(0.05)
        self.orphans += loaders

    def wait(self, timeout: float) -> int | None:
        """The exit code of a run left to finish; None (and the trainer killed) if it did not within `timeout`."""
        assert self.process is not None, "started first"
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.exits.append((self.process.wait(), True))
            self.process = None
            return None
        self.exits.append((code, False))
        self.process = None
        return code


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's reaper here may never reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def loader_pids(trainer: int) -> list[int]:
    """The trainer's forked children (the `streamssl-loader` process): its command line, under its pid."""
    try:
        own = Path(f"/proc/{trainer}/cmdline").read_bytes()
        tasks = list(Path(f"/proc/{trainer}/task").iterdir())
    except OSError:
        return []
    pids = []
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            try:
                if Path(f"/proc/{child}/cmdline").read_bytes() == own:
                    pids.append(child)
            except OSError:
                continue
    return pids


def newest_step(run_dir: Path) -> int:
    """The newest step the run dir shows: the audit trail's last line, else the newest checkpoint's name."""
    audit = run_dir / "trained-keys.jsonl"
    try:
        with open(audit, "rb") as handle:
            handle.seek(max(0, os.path.getsize(audit) - 65536))
            last = handle.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]
        return int(json.loads(last)["step"])
    except (OSError, ValueError, KeyError):
        pass
    names = [p.name for p in (run_dir / "checkpoints").glob("ckpt-*.pt")]
    return max((int(name[5:14]) for name in names), default=0)


def _entries(directory: Path) -> set[str]:
    try:
        return set(os.listdir(directory))
    except FileNotFoundError:
        return set()


def wait_until(condition: Callable[[], Any], timeout: float, target: Target, poll: float = POLL_SECONDS) -> Any:
    """The first true value of `condition` (polled), or None on timeout or when the trainer exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if target.process is not None and target.exited():
            return None
        time.sleep(poll)
    return None


def wait_for_progress(target: Target, steps: int = 1, timeout: float = AIM_SECONDS) -> bool:
    """True once the run dir shows `steps` more steps than now."""
    start = newest_step(target.run_dir)
    return bool(wait_until(lambda: newest_step(target.run_dir) >= start + steps, timeout, target, poll=0.05))


def _new_entry(directory: Path, known: set[str], wanted: Callable[[str], bool], nth: int) -> Callable[[], str]:
    """A condition: the name of the `nth` new entry of `directory` that `wanted` accepts, once there is one."""
    seen: list[str] = []

    def check() -> str:
        for name in sorted(_entries(directory) - known):
            if wanted(name) and name not in seen:
                seen.append(name)
        return seen[nth - 1] if len(seen) >= nth else ""

    return check


def aim_and_kill(target: Target, aim: str, rng: random.Random, startup_estimate: float) -> str:
    """Waits for the moment `aim` names, kills the trainer, and returns what the aim saw there."""
    checkpoints, published = target.run_dir / "checkpoints", target.run_dir / "published"
    nth = rng.randint(1, 3)  # the 1st-3rd checkpoint of this start: a kill at the 1st alone would never move on
    hit: Any = None
    if aim == "startup":  # resuming, forking the loader, joining the group, the first fetch
        delay = rng.uniform(0, startup_estimate)
        if wait_until(lambda: time.monotonic() - target.started_monotonic >= delay, delay + 1, target, poll=0.01):
            hit = f"{delay:.2f} s after the start"
    elif aim == "random":  # 1-4 steps on, then a random part of a step: mid-step, mid-checkpoint, mid-publish
        steps, delay = rng.randint(1, 4), rng.uniform(0, 0.5)
        if wait_for_progress(target, steps):
            time.sleep(delay)
            hit = f"{delay:.2f} s after {steps} steps"
    elif aim == "checkpoint-write":  # atomic_write's temp file exists: torch.save, flush or fsync under way
        hit = wait_until(_new_entry(checkpoints, _entries(checkpoints), lambda n: n.endswith(".tmp"), nth),
                         AIM_SECONDS, target)
    elif aim == "checkpoint-renamed":  # the rename happened: its directory fsync, the Kafka commit, the publish follow
        hit = wait_until(_new_entry(checkpoints, _entries(checkpoints), lambda n: n.endswith(".pt"), nth),
                         AIM_SECONDS, target)
    elif aim == "publish":  # a version's temp folder, or the temp link that replaces `latest`
        hit = wait_until(_new_entry(published, _entries(published), lambda n: n.startswith("."), nth),
                         AIM_SECONDS, target)
    else:
        raise ValueError(f"unknown aim {aim}")
    if target.process is None:  # it exited before the aim fired: recorded in target.exits
        return EXITED
    target.kill()
    if not hit:
        return "aim timed out: killed anyway"
    if aim in ("checkpoint-write", "publish"):  # still there: the kill came before the rename
        folder = checkpoints if aim == "checkpoint-write" else published
        hit = f"{hit} {INSIDE if (folder / hit).exists() else '(gone: renamed before the kill)'}"
    return str(hit)


def kill_loader(target: Target, rng: random.Random) -> str:
    """kill -9 of the trainer's loader process a moment after a step; the trainer must start a new one itself."""
    if not wait_for_progress(target):
        return NO_STEP if target.process is not None else EXITED
    time.sleep(rng.uniform(0, 1.0))
    loaders = loader_pids(target.pid) if target.process is not None else []
    replaced = _replacements(target)
    for pid in loaders:
        os.kill(pid, signal.SIGKILL)
    # The next kill waits for the trainer to notice and replace its loader: a trainer killed a moment later would
    # never log the replacement this kill is there to check.
    deadline = time.monotonic() + LOADER_REPLACE_SECONDS
    while loaders and _replacements(target) == replaced and not target.exited() and time.monotonic() < deadline:
        time.sleep(0.05)
    return f"loader pid {loaders[0]}" if loaders else NO_LOADER


def _replacements(target: Target) -> int:
    """How many times the trainer's log says it replaced its loader."""
    try:
        return target.log_path.read_text(errors="replace").count(LOADER_REPLACED)
    except OSError:
        return 0


def kill_broker(broker: Any, target: Target, rng: random.Random) -> str:
    """kill -9 of the Tansu broker a moment after a step, then the same broker again on its port and storage."""
    if not wait_for_progress(target):
        return NO_STEP if target.process is not None else EXITED
    time.sleep(rng.uniform(0, 1.0))
    broker.kill()
    down = rng.uniform(0, 3.0)
    time.sleep(down)
    broker.restart()
    return f"down {down:.1f} s"
