"""The `streamssl` command end to end, in real subprocesses: errors, run, SIGTERM, eval."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamssl.models import load_encoder

TINY = ["--set", "train.batch_size=32", "--set", "model.bn_splits=4", "--set", "moco.queue_size=128",
        "--set", "eval.bank_size=300", "--set", "eval.test_size=100", "--set", "eval.every_steps=0",
        "--metrics-port", "0"]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "streamssl.pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.parametrize(("args", "message"), [
    (["run", "--data", "/nonexistent/lake"], "data path not found: /nonexistent/lake"),
    (["run", "--set", "train.batch_sise=3"], "did you mean train.batch_size?"),
    (["run", "--set", "optim.lr=fast"], "optim.lr: expected float"),
    (["run", "--config", "/nonexistent.yaml"], "config file not found"),
    (["run", "--method", "nosuch"], "method: 'nosuch' is not one of"),
    (["eval", "--encoder", "/nonexistent/encoder"], "encoder folder not found"),
])
def test_bad_input_exits_nonzero_with_one_line(args: list[str], message: str) -> None:
    result = _cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0] and "Traceback" not in result.stderr


def test_busy_metrics_port_is_one_readable_error(tmp_path: Path, small_lake: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _cli("run", "--data", str(small_lake), "--run-dir", str(tmp_path / "run"), "--max-steps", "1",
                      "--metrics-port", str(port))
    assert result.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr


def test_run_publishes_and_eval_scores_it(tmp_path: Path, small_lake: Path) -> None:
    run_dir = tmp_path / "run"
    result = _cli("run", "--data", str(small_lake), "--run-dir", str(run_dir), "--max-steps", "3", *TINY)
    assert result.returncode == 0, result.stderr
    assert "done: reached max_steps 3; step 3, 96 samples, kNN top-1" in result.stdout
    manifest = json.loads((run_dir / "published" / "latest" / "manifest.json").read_text())
    assert manifest["step"] == 3 and manifest["samples_seen"] == 96 and manifest["method"] == "moco"
    assert 0.1 < manifest["metrics"]["knn_top1"] <= 1

    # the regression gate off: a kNN score over 100 test images moves in steps of 0.01, by chance past 0.02
    again = _cli("run", "--data", str(small_lake), "--run-dir", str(run_dir), "--max-steps", "5", *TINY,
                 "--set", "publish.tolerance=1")
    assert again.returncode == 0, again.stderr
    assert "resumed from ckpt-000000003.pt at step 3" in again.stderr
    assert "step 5, 160 samples" in again.stdout

    scored = _cli("eval", "--encoder", str(run_dir / "published" / "latest"), "--bank-size", "500",
                  "--test-size", "200")
    assert scored.returncode == 0, scored.stderr
    report = json.loads(scored.stdout)
    assert report["step"] == 5 and report["version"] == 2 and report["bank_size"] == 500
    assert 0.1 < report["knn_top1"] <= 1
    assert load_encoder(run_dir / "published" / "latest").manifest["version"] == 2


def _sigterm_while_training(run_dir: Path, lake: Path, *sets: str) -> tuple[int, str, str, float]:
    """A real `streamssl run`, sent SIGTERM once it prints a progress line: (exit code, stdout, stderr, seconds
    from the signal to the exit)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "streamssl.pipeline.cli", "run", "--data", str(lake), "--run-dir", str(run_dir),
         *TINY, "--set", "train.log_every_seconds=0.1", *sets],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 90
        assert process.stdout is not None
        while time.monotonic() < deadline:  # wait until it is really training
            if " step " in process.stdout.readline():  # a progress line: `<ISO time> step N | …`
                break
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
        return process.returncode, stdout, stderr, time.monotonic() - signalled
    finally:
        process.kill()


def test_sigterm_finishes_the_step_checkpoints_and_publishes(tmp_path: Path, small_lake: Path) -> None:
    run_dir = tmp_path / "run"
    returncode, stdout, stderr, _ = _sigterm_while_training(run_dir, small_lake, "--set", "eval.dataset=none")
    assert returncode == 0, stderr
    assert "SIGTERM received" in stderr
    assert "done: stop requested" in stdout
    checkpoints = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))
    manifest = json.loads((run_dir / "published" / "latest" / "manifest.json").read_text())
    assert checkpoints and int(checkpoints[-1].stem.split("-")[1]) == manifest["step"] > 0


def test_sigterm_with_the_knn_monitor_exits_soon_and_the_next_start_publishes_that_step(
        tmp_path: Path, small_lake: Path) -> None:
    """A kNN pass outlasts an orchestrator's grace period: the signal checkpoints and exits, and the next start
    evaluates and publishes those weights before training on."""
    run_dir = tmp_path / "run"
    returncode, _, stderr, stopped = _sigterm_while_training(run_dir, small_lake)
    assert returncode == 0, stderr
    assert stopped < 15, f"SIGTERM to exit took {stopped:.1f} s"
    step = int(sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))[-1].stem.split("-")[1])
    assert step > 0 and f"step {step} is evaluated and published at the next start" in stderr
    assert not (run_dir / "published" / "latest").exists()

    again = _cli("run", "--data", str(small_lake), "--run-dir", str(run_dir), "--max-steps", str(step), *TINY)
    assert again.returncode == 0, again.stderr
    manifest = json.loads((run_dir / "published" / "latest" / "manifest.json").read_text())
    assert manifest["step"] == step and manifest["metrics"]["knn_step"] == step
    assert 0.1 < manifest["metrics"]["knn_top1"] <= 1
    assert len(list((run_dir / "published").glob("v*"))) == 1  # the finish of the second start publishes no twin
