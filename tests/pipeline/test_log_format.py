"""Progress and log lines: ISO time first, an ETA for bounded runs, `--log-format json` one object per line."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from streamssl.pipeline.log_format import ProgressLine, ProgressLog, clock, setup_logging
from streamssl.pipeline.run_state import RunState
from streamssl.pipeline.sections import TrainConfig


def strict_json(line: str) -> dict[str, Any]:
    """json.loads that refuses NaN/Infinity, which a log aggregator's parser would refuse too."""
    def refuse(name: str) -> None:
        raise ValueError(f"{name} in {line}")

    parsed = json.loads(line, parse_constant=refuse)
    assert isinstance(parsed, dict)
    return parsed


def progress_log(out: io.StringIO, elapsed: float, **train: Any) -> ProgressLog:
    log = ProgressLog(out, TrainConfig(**train))
    log.start(0)
    log.started -= elapsed  # as if this invocation had started `elapsed` seconds ago
    return log


@pytest.mark.parametrize(("train", "step", "eta"), [
    ({"max_steps": 100}, 10, 90.0),  # 10 steps in 10 s: 90 to go
    ({"max_minutes": 1.0}, 10, 50.0),  # 50 s of the budget left
    ({"max_steps": 100, "max_minutes": 1.0}, 10, 50.0),  # the nearer bound
    ({"max_steps": 12, "max_minutes": 1.0}, 10, 2.0),
    ({}, 10, None),  # unbounded: no ETA
    ({"max_steps": 100}, 0, None),  # no step timed yet
])
def test_eta_is_the_nearer_bound(train: dict[str, Any], step: int, eta: float | None) -> None:
    found = progress_log(io.StringIO(), 10.0, **train).eta_seconds(step)
    assert found == eta if eta is None else found == pytest.approx(eta, abs=0.5)


def test_clock() -> None:
    assert [clock(s) for s in (0, 44.6, 245, 7380, -3)] == ["0s", "45s", "4m05s", "2h03m", "0s"]


def test_text_progress_starts_with_iso_time_and_ends_with_the_eta() -> None:
    out = io.StringIO()
    log = progress_log(out, 10.0, max_steps=100)
    log.progress(ProgressLine("step 10 | 320 samples/s", lr=0.1), RunState(step=10), {"loss": 1.0})
    log.progress("step 20 | 320 samples/s", RunState(step=20), {})
    log.done("done: reached max_steps 100; step 100", RunState(step=100))
    lines = out.getvalue().splitlines()
    stamp, _, rest = lines[0].partition(" ")
    assert abs(datetime.fromisoformat(stamp).timestamp() - time.time()) < 5 and datetime.fromisoformat(stamp).tzinfo
    assert rest.startswith("step 10 | 320 samples/s | eta 1m") and lines[1].endswith("| eta 40s")
    assert lines[2].split(" ", 1)[1] == "done: reached max_steps 100; step 100"
    unbounded = io.StringIO()
    progress_log(unbounded, 10.0).progress("step 10", RunState(step=10), {})
    assert "eta" not in unbounded.getvalue()


def test_json_progress_is_one_object_per_line_with_its_values() -> None:
    out = io.StringIO()
    log = progress_log(out, 10.0, max_steps=100, log_format="json")
    state = RunState(step=10, samples_seen=320, eval_metrics={"knn_top1": 0.71, "knn_step": 5.0})
    log.progress(ProgressLine("step 10 | loss nan", lr=0.05), state, {"samples_per_second": 32.0, "loss": float("nan")})
    log.done("done: stop requested; step 10", state)
    progress, done = map(strict_json, out.getvalue().splitlines())
    assert progress["event"] == "progress" and progress["level"] == "info" and progress["message"] == "step 10 | loss nan"
    assert (progress["step"], progress["samples_seen"], progress["lr"], progress["knn_top1"]) == (10, 320, 0.05, 0.71)
    assert progress["loss"] is None and progress["samples_per_second"] == 32.0
    assert progress["eta_seconds"] == pytest.approx(90, abs=0.5)
    datetime.fromisoformat(progress["time"])
    assert (done["event"], done["message"], done["step"]) == ("done", "done: stop requested; step 10", 10)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_log_records_in_both_formats() -> None:
    stream = io.StringIO()
    setup_logging("json", stream)
    logger = logging.getLogger("streamssl.test")
    logger.warning("waiting for new shards in %s", "/lake")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("it failed")
    record, failed = map(strict_json, stream.getvalue().splitlines())
    assert (record["level"], record["message"], record["logger"], record["event"]) == (
        "warning", "waiting for new shards in /lake", "streamssl.test", "log")
    assert failed["level"] == "error" and "RuntimeError: boom" in failed["exception"]
    text = io.StringIO()
    setup_logging("text", text)
    logger.info("hello")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d INFO streamssl.test: hello\n", text.getvalue())


def test_cli_json_output_parses_line_by_line(tmp_path: Path, small_lake: Path) -> None:
    from tests.conftest import tiny_sets

    sets = [arg for item in tiny_sets(tmp_path / "run", small_lake, "train.log_every_seconds=0")
            for arg in ("--set", item)]
    result = subprocess.run([sys.executable, "-m", "streamssl.pipeline.cli", "run", "--log-format", "json",
                             "--max-steps", "3", *sets], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr
    out = [strict_json(line) for line in result.stdout.splitlines()]
    logged = [strict_json(line) for line in result.stderr.splitlines()]
    assert [entry["step"] for entry in out if entry["event"] == "progress"] == [1, 2, 3]
    assert all(entry["eta_seconds"] is not None and "loss" in entry for entry in out if entry["event"] == "progress")
    assert out[-1]["event"] == "done" and out[-1]["message"].startswith("done: reached max_steps 3; step 3")
    assert any(entry["message"].startswith("stopping: reached max_steps 3") for entry in logged)


def test_an_unbounded_run_says_so_at_start(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="streamssl.pipeline.log_format"):
        ProgressLog(io.StringIO(), TrainConfig(max_steps=10)).start(0)
        ProgressLog(io.StringIO(), TrainConfig(max_minutes=1.0)).start(0)
        assert not caplog.records
        ProgressLog(io.StringIO(), TrainConfig()).start(0)
    assert [r.getMessage() for r in caplog.records] == [
        "no step or time budget: training until stopped (a stop finishes the step, checkpoints, publishes)"]
