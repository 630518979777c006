"""The series job's audit trail (train.audit_keys): every point the job takes, by series id and timestamp, so that
a chaos check can count points trained twice as it counts image records."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from streamssl.pipeline.config import load_config
from streamssl.pipeline.series.job import SeriesJob
from streamssl.streams.series_source import write_series_file

POINTS = 200


def _job(run_dir: Path, data: Path, steps: int) -> SeriesJob:
    return SeriesJob(load_config(sets=[
        f"run_dir={run_dir}", f"data.source={data}", "data.mode=once", "metrics.port=0", "train.max_minutes=0",
        "train.log_every_seconds=1000", "checkpoint.every_steps=5", "checkpoint.every_seconds=0",
        "train.audit_keys=true", "series.warmup_points=64", "series.window=32", "series.lag=8",
        "series.batch_size=8", "series.eval_points=50", f"train.max_steps={steps}", "method=forecast",
        "forecast.mode=single", "forecast.hidden=16"]))


def _audit(run_dir: Path) -> list[tuple[int, str]]:
    lines = [json.loads(line) for line in (run_dir / "trained-keys.jsonl").read_text().splitlines()]
    return [(line["step"], key) for line in lines for key in line["keys"]]


def test_every_point_taken_is_audited_once_and_a_lost_checkpoint_shows_as_duplicates(tmp_path: Path) -> None:
    t = np.arange(POINTS)
    data = tmp_path / "series"
    data.mkdir()
    write_series_file(data / "part-000.parquet", t.astype(float), 5 + 2 * np.sin(t / 6.0))
    run_dir = tmp_path / "run"
    first = _job(run_dir, data, 8)
    first.run()
    audited = _audit(run_dir)
    keys = [key for _, key in audited]
    assert len(keys) == first.task.points_seen > 64 and len(set(keys)) == len(keys)  # each point once
    assert keys[:2] == ["default@0.0", "default@1.0"]  # series id (the file has no id column) @ timestamp

    # The checkpoint of step 8 is lost (as by a kill -9 before it was durable: deleted here, the test's fault):
    # the next start resumes from step 5 and takes the points after it again, which the audit shows.
    (run_dir / "checkpoints" / "ckpt-000000008.pt").unlink()
    again = _job(run_dir, data, 10)
    again.run()
    counts = Counter(key for _, key in _audit(run_dir))
    twice = {key for key, count in counts.items() if count == 2}
    assert twice == {key for step, key in audited if step >= 5} and max(counts.values()) == 2
