"""RUN_DIR/metrics.jsonl (pipeline/history.py): what a real run appends, across a resume, a crash's torn line,
non-finite values, rotation at the size limit, and the lineage a report draws."""

from __future__ import annotations

import json
from pathlib import Path

from streamssl.pipeline.history import History, read_history, rotated, surviving
from streamssl.pipeline.images import Trainer
from streamssl.pipeline.run_state import RunState
from tests.conftest import tiny_config

# The cheapest kNN monitor (the one tests/pipeline/test_cli.py uses): its eval lines carry the baselines too.
KNN = ("eval.dataset=fashion-mnist", "eval.bank_size=300", "eval.test_size=100", "eval.every_steps=2",
       "train.log_every_seconds=0")


def test_a_run_appends_progress_eval_and_publish_lines_and_a_resume_only_appends(
        tmp_path: Path, small_lake: Path, one_thread: None) -> None:
    run_dir = tmp_path / "run"
    Trainer(tiny_config(run_dir, small_lake, *KNN, "train.max_steps=4")).run()
    history = run_dir / "metrics.jsonl"
    first = history.read_bytes()
    # the resumed part without the kNN monitor: its ~5 s of Fashion-MNIST loading and baselines buy nothing more here
    Trainer(tiny_config(run_dir, small_lake, "train.log_every_seconds=0", "train.max_steps=6")).run()
    assert history.read_bytes().startswith(first)  # appended, never rewritten

    rows = read_history(history)
    progress = [row for row in rows if row["kind"] == "progress"]
    assert [row["step"] for row in progress] == [1, 2, 3, 4, 5, 6]
    assert [row["samples_seen"] for row in progress] == [32 * step for step in range(1, 7)]
    for row in progress:
        assert row["samples_per_second"] > 0 and 0 <= row["input_wait_share"] <= 1
        assert row["embedding_std"] > 0 and "queue_fill" in row  # the method's own logs
    evals = [row for row in rows if row["kind"] == "eval"]
    assert [row["step"] for row in evals] == [2, 4]  # every 2 steps; the end is one of them
    assert all(0 < row["knn_top1"] <= 1 and 0 < row["knn_raw_pixels"] <= 1 for row in evals)
    publishes = [(row["step"], row["version"]) for row in rows if row["kind"] == "publish"]
    assert publishes == [(2, 1), (4, 2), (6, 3)]  # a checkpoint every 2 steps, each published
    times = [row["time"] for row in rows]
    assert times == sorted(times)


def _state(step: int) -> RunState:
    return RunState(step=step, samples_seen=32 * step)


def test_a_torn_last_line_is_skipped_and_the_next_run_starts_a_line_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    History(path).append("progress", _state(1), {"loss": 1.0})
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"time": 1, "kind": "progress", "st')  # the crash cut this line short
    assert [row["step"] for row in read_history(path)] == [1]

    resumed = History(path)  # the next run: its first line must not be glued to the torn one
    resumed.append("progress", _state(2), {"loss": 0.5})
    resumed.append("eval", _state(2), {"knn_top1": 0.7})
    assert [(row["kind"], row["step"]) for row in read_history(path)] == [("progress", 1), ("progress", 2), ("eval", 2)]


def test_non_finite_values_are_written_as_null(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    History(path).append("progress", _state(0), {"loss": float("nan"), "lr": float("inf"), "queue_fill": 0.5})
    line = path.read_text().strip()
    assert "NaN" not in line and "Infinity" not in line
    row = json.loads(line, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))  # strict JSON
    assert row["loss"] is None and row["lr"] is None and row["queue_fill"] == 0.5


def test_history_rotates_at_its_size_limit_and_is_read_across_both_parts(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    history = History(path, max_bytes=2000)
    for step in range(1, 101):
        history.append("progress", _state(step), {"loss": 1.0 / step})
    assert path.stat().st_size <= 2000 and rotated(path).stat().st_size <= 2000
    assert not path.with_name("metrics.jsonl.2").exists()  # bounded: one older part at most
    steps = [row["step"] for row in read_history(path)]
    assert steps == list(range(steps[0], 101)) and steps[0] > 1  # the newest, in order, with nothing torn
    assert len(steps) > 2000 // 110  # both parts are read (~100 bytes a line)


def test_disabled_history_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    History(path, enabled=False).append("progress", _state(1), {"loss": 1.0})
    assert not path.exists() and read_history(path) == []


def test_surviving_drops_the_rows_a_resume_from_an_older_checkpoint_superseded() -> None:
    def row(kind: str, samples: int) -> dict[str, object]:
        return {"kind": kind, "samples_seen": samples}

    rows = [row("progress", 32), row("eval", 64), row("publish", 64), row("progress", 96), row("progress", 128),
            # the run crashed at 128 and resumed from its checkpoint at 64: 96 and 128 are trained again
            row("progress", 96), row("progress", 128), row("eval", 128)]
    kept = surviving(rows)
    assert kept == rows[:3] + rows[5:]
