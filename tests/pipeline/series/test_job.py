"""The continuous series job on real Parquet files: prequential order, exact resume, publishing, dead letters, follow."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from streamssl.models import load_encoder
from streamssl.models.forecaster import Forecaster
from streamssl.pipeline.config import ConfigError, load_config
from streamssl.pipeline.loading.messages import Reject
from streamssl.pipeline.series.examples import forecast_errors
from streamssl.pipeline.series.job import SeriesJob, run_series
from streamssl.streams.kafka_produce import create_topic, produce
from streamssl.streams.kafka_source import KafkaSource
from streamssl.streams.records import SourceError
from streamssl.streams.series_source import SeriesFilePosition, write_series_file
from tests.conftest import read_to_end

WARMUP, WINDOW, LAG, BATCH = 64, 32, 8, 8


def _series(points: int, seed: int = 0) -> np.ndarray:
    t = np.arange(points)
    return 5.0 + 2.0 * np.sin(t / 6.0) + 0.5 * np.sin(t / 2.3) + 0.1 * np.random.default_rng(seed).normal(size=points)


def _lake(directory: Path, values: np.ndarray, rows_per_file: int = 200) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for number, start in enumerate(range(0, len(values), rows_per_file)):
        rows = np.arange(start, min(start + rows_per_file, len(values)))
        write_series_file(directory / f"part-{number:03d}.parquet", rows.astype(float), values[rows])
    return directory


def _config(run_dir: Path, data: Path, method: str = "forecast", *sets: str, mode: str = "single") -> Any:
    cfg = load_config(sets=[
        f"run_dir={run_dir}", f"data.source={data}", "data.mode=once", "metrics.port=0", "train.max_minutes=0",
        "train.log_every_seconds=1000", "checkpoint.every_steps=5", "checkpoint.every_seconds=0",
        f"series.warmup_points={WARMUP}", f"series.window={WINDOW}", f"series.lag={LAG}", f"series.batch_size={BATCH}",
        "series.eval_points=50", "series.history=96", "series.points_per_step=4", "series.trials=4",
        "series.max_imfs=2", "series.processes=1", f"method={method}",
        *([f"forecast.mode={mode}", "forecast.hidden=16"] if method == "forecast" else []), *sets])
    return cfg


def _assert_same(a: Any, b: Any, where: str = "", close: bool = False) -> None:
    """Equal, recursively; with `close`, floats only to within kernel rounding (integers stay exact)."""
    assert type(a) is type(b), where
    if close and (isinstance(a, float) or (isinstance(a, torch.Tensor) and a.is_floating_point())):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-4, msg=where)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}", close)
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{index}]", close)
    else:
        assert a == b, where


def _resumable_state(job: SeriesJob) -> dict[str, Any]:
    state = job.checkpoint_state()
    for name in ("config", "checkpoints_written"):  # the run dir differs; the split run wrote one more checkpoint
        state.pop(name)
    return state


def test_forecasts_are_made_before_the_model_learns_from_their_targets(tmp_path: Path) -> None:
    values = _series(160)
    cfg = _config(tmp_path / "run", _lake(tmp_path / "data", values), "forecast", "train.max_steps=1")
    job = SeriesJob(cfg)
    job.run()
    mean, std = values[:WARMUP].mean(), values[:WARMUP].std()
    z = (values - mean) / std
    torch.manual_seed(cfg.train.seed)
    untrained = Forecaster(1, LAG, 0, **job.task.options)
    origins = np.arange(WARMUP - 1, WARMUP - 1 + BATCH)  # the first origin is the warm-up's last point
    inputs = torch.tensor(np.stack([z[t - LAG + 1:t + 1] for t in origins]), dtype=torch.float32)[:, None]
    expected = torch.stack([untrained.predict(row[None])[0] for row in inputs])
    # the BATCH forecasts scored before step 1 are exactly the untrained model's, against the next points
    assert job.state.step == 1 and job.task.scored_count == BATCH
    assert torch.equal(job.task.scored[:BATCH, 0], expected)
    np.testing.assert_allclose(job.task.scored[:BATCH, 1].numpy(), z[origins + 1], rtol=1e-6)
    np.testing.assert_allclose(job.task.scored[:BATCH, 2].numpy(), z[origins], rtol=1e-6)  # persistence: x[t]
    # the forecast made after the step (origin of the point that completed the batch) is the trained model's
    origin, pending_inputs, forecast, _ = job.task.pending["default"][0]
    assert origin == origins[-1] + 1
    assert not torch.equal(forecast, untrained.predict(pending_inputs[None])[0])
    rows = job.task.scored[:BATCH].double().numpy()
    manifest = json.loads((tmp_path / "run" / "published" / "latest" / "manifest.json").read_text())
    nrmse = forecast_errors(rows[:, 0], rows[:, 1])["nrmse"]
    assert manifest["metrics"]["rolling_nrmse"] == pytest.approx(nrmse)
    assert job.metrics.registry.get_sample_value("streamssl_method_stat", {"stat": "rolling_nrmse"}) == pytest.approx(nrmse)
    assert manifest["input"]["series"]["default"] == {"mean": pytest.approx(mean), "std": pytest.approx(std)}
    assert manifest["input"]["channel_names"] == ["series"] and manifest["input"]["lag"] == LAG
    assert manifest["input"]["window"] == WINDOW and manifest["groups"] is None and manifest["step"] == 1


@pytest.mark.parametrize(("method", "mode", "steps", "window"), [
    ("forecast", "single", 16, WINDOW), ("cpc", "", 12, 64), ("forecast", "combined", 8, WINDOW)])
def test_n_steps_straight_equal_half_and_half_across_a_restart(tmp_path: Path, method: str, mode: str, steps: int,
                                                               window: int) -> None:
    data = _lake(tmp_path / "data", _series(400))

    def job(run_dir: str, max_steps: int) -> SeriesJob:
        return SeriesJob(_config(tmp_path / run_dir, data, method, f"train.max_steps={max_steps}",
                                 f"series.window={window}", mode=mode))

    straight = job("straight", steps)
    straight.run()
    first = job("split", steps // 2)
    first.run()
    assert first.state.step == steps // 2
    second = job("split", steps)  # a new job in the same run dir: resumes from the checkpoint
    second.run()
    assert straight.state.step == second.state.step == steps
    _assert_same(_resumable_state(straight), _resumable_state(second))
    manifest = json.loads((tmp_path / "split" / "published" / "latest" / "manifest.json").read_text())
    assert manifest["step"] == steps and manifest["method"] == method and manifest["input"]["window"] == window
    # a downstream consumer loads the published trunk without training code: it reproduces the job's features
    encoder = load_encoder(tmp_path / "split" / "published" / "latest")
    channels, length = manifest["input"]["channels"], manifest["input"].get("lag", window)
    windows = torch.randn(3, channels, length)
    with torch.no_grad():
        torch.testing.assert_close(encoder(windows), second.task.model.encoder().eval()(windows))
    if mode == "combined":  # the grouping was decided once, on the warm-up, and kept across the restart
        groups = second.checkpoint_state()["groups"]
        assert groups == manifest["groups"] and sorted(groups["aux"] + groups["views"]) == [0, 1, 2]
        assert manifest["input"]["channels"] == 1 + len(groups["views"]) == len(manifest["input"]["channel_names"])
        assert manifest["decomposition"]["window"] == WINDOW and manifest["decomposition"]["trials"] == 4


def test_a_restart_inside_the_warm_up_continues_it_exactly(tmp_path: Path) -> None:
    values = _series(200)
    _lake(tmp_path / "all", values, rows_per_file=40)
    straight = SeriesJob(_config(tmp_path / "straight", tmp_path / "all", "forecast", mode="combined"))
    straight.run()
    growing = _lake(tmp_path / "growing", values[:40], rows_per_file=40)
    first = SeriesJob(_config(tmp_path / "split", growing, "forecast", mode="combined"))
    first.run()  # the stream ends after 40 points: warm-up unfinished, no model, no grouping yet
    assert first.task.model is None and first.task.groups is None and len(first.task.warmup["default"]) == 40
    _lake(tmp_path / "growing", values, rows_per_file=40)  # rewrites part-000 unchanged, adds part-001..004
    second = SeriesJob(_config(tmp_path / "split", growing, "forecast", mode="combined"))
    second.run()
    assert second.state.step == straight.state.step == (200 - WARMUP) // BATCH
    _assert_same(_resumable_state(straight), _resumable_state(second))


def test_bad_points_are_dead_lettered_by_reason_and_training_goes_on(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    values = _series(120)
    rows = [f"{t},{float(v)!r}" for t, v in enumerate(values)]
    # at time 69: another value, the same value again, a time between two accepted ones, no time at all
    rows[70:70] = ["69,123.0", "69," + repr(float(values[69])), "50.5,1.0", "soon,1.0"]
    rows[90] = "89,inf"
    rows[100] = "99,oops"
    (data / "part-000.csv").write_text("timestamp,value\n" + "\n".join(rows) + "\n")
    job = SeriesJob(_config(tmp_path / "run", data, "forecast"))
    state = job.run()
    assert job.dead_letters.counts == {"conflicting_duplicate": 1, "duplicate": 1, "out_of_order": 1,
                                       "bad_timestamp": 1, "non_finite_value": 1, "non_numeric_value": 1}
    reasons = [json.loads(line)["reason"] for line in (tmp_path / "run" / "dead-letter.jsonl").read_text().splitlines()]
    assert reasons == ["conflicting_duplicate", "duplicate", "out_of_order", "bad_timestamp", "non_finite_value",
                       "non_numeric_value"]
    assert job.task.windows.count("default") == 118 and job.task.scored_count == 118 - WARMUP
    assert state.step == (118 - WARMUP) // BATCH
    metric = job.metrics.registry.get_sample_value("streamssl_records_rejected_total", {"reason": "out_of_order"})
    assert metric == 1.0


def test_each_series_has_its_own_warm_up_statistics_windows_and_forecasts(tmp_path: Path) -> None:
    small, large = _series(150, seed=1), 1000.0 + 300.0 * _series(150, seed=2)
    data = tmp_path / "data"
    data.mkdir()
    times = np.repeat(np.arange(150, dtype=float), 2)  # rows alternate between the series
    write_series_file(data / "part-000.parquet", times, np.stack([small, large], axis=1).ravel(), ["s", "l"] * 150)
    job = SeriesJob(_config(tmp_path / "run", data, "forecast", "series.series_column=series_id"))
    job.run()
    assert job.task.norm["s"] == (pytest.approx(small[:WARMUP].mean()), pytest.approx(small[:WARMUP].std()))
    assert job.task.norm["l"] == (pytest.approx(large[:WARMUP].mean()), pytest.approx(large[:WARMUP].std()))
    assert job.task.scored_count == 2 * (150 - WARMUP) and job.state.samples_seen == job.task.scored_count // BATCH * BATCH
    # scored in each series' own z units: both the same scale, so one rolling nRMSE is meaningful for both
    assert job.task.scored[: job.task.scored_count, 1].abs().max() < 5
    manifest = json.loads((tmp_path / "run" / "published" / "latest" / "manifest.json").read_text())
    assert set(manifest["input"]["series"]) == {"s", "l"}


def test_series_state_is_bounded_by_max_series_however_many_ids_the_stream_brings(tmp_path: Path) -> None:
    # a producer bug that makes every point a new series (here: 400 ids) once grew the windows, warm-ups,
    # statistics, checkpoints and the manifest without bound
    data = tmp_path / "data"
    data.mkdir()
    steady = _series(150)
    rows = [(float(t), float(steady[t]), "steady") for t in range(150)]
    rows[60:60] = [(float(t), 1.0, f"noise-{t}") for t in range(400)]
    times, values, ids = zip(*rows, strict=True)
    write_series_file(data / "part-000.parquet", times, values, ids)
    job = SeriesJob(_config(tmp_path / "run", data, "forecast", "series.series_column=series_id", "series.max_series=8"))
    job.run()
    task = job.task
    assert len(task.windows.series_ids()) <= 8 and len(task.warmup) + len(task.norm) <= 8 and len(task.pending) <= 8
    # 402 series began (steady, 400 noise ids, steady again after it was dropped during the burst); 8 are kept
    assert task.series_dropped == 402 - 8
    assert task.windows.count("steady") == 150 - 60  # afresh: its first 60 points were dropped with it
    assert len(job.checkpoint_state()["windows"]["series"]) <= 8


def test_a_growing_directory_is_followed_until_stop_then_checkpointed_and_published(tmp_path: Path) -> None:
    values = _series(200)
    data = _lake(tmp_path / "data", values[:100], rows_per_file=100)
    stop = threading.Event()
    job = SeriesJob(_config(tmp_path / "run", data, "forecast", "data.mode=follow", "data.poll_seconds=0.05"), stop)
    runner = threading.Thread(target=job.run)
    runner.start()
    deadline = time.monotonic() + 30
    while job.task.points_seen < 100 and time.monotonic() < deadline:
        time.sleep(0.02)
    write_series_file(data / "part-001.parquet", np.arange(100, 200, dtype=float), values[100:])
    while job.task.points_seen < 200 and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    runner.join(timeout=30)
    assert not runner.is_alive() and job.task.points_seen == 200
    checkpoint = torch.load(job.checkpointer.paths()[-1], weights_only=True)
    assert checkpoint["source"] == {"file": "part-001.parquet", "row": 100, "files_done": 1, "rows_before": 100}
    assert checkpoint["points_seen"] == 200 and job.state.published_step == job.state.step == (200 - WARMUP) // BATCH


def test_bad_settings_fail_before_anything_is_written(tmp_path: Path) -> None:
    data = _lake(tmp_path / "data", _series(100))
    with pytest.raises(ConfigError, match="warmup_points"):
        run_series(_config(tmp_path / "a", data, "forecast", "series.warmup_points=16"))
    with pytest.raises(ConfigError, match="cycle"):
        run_series(_config(tmp_path / "b", data, "forecast", "data.mode=cycle"))
    with pytest.raises(ConfigError, match="persistence"):
        run_series(_config(tmp_path / "c", data, "forecast", mode="persistence"))
    with pytest.raises(ConfigError, match="latents"):
        run_series(_config(tmp_path / "d", data, "cpc", "series.window=16", "series.warmup_points=64"))
    with pytest.raises(SourceError, match="not found"):
        run_series(_config(tmp_path / "e", tmp_path / "missing", "forecast"))
    assert not any((tmp_path / name).exists() for name in "abce")


@pytest.mark.parametrize("method", ["forecast", "cpc"])
def test_streamssl_run_trains_series_methods_and_resumes(tmp_path: Path, method: str) -> None:
    data = _lake(tmp_path / "data", _series(400))
    run_dir = tmp_path / "run"

    def cli(max_steps: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "streamssl.pipeline.cli", "run", "--method", method, "--data", str(data),
             "--run-dir", str(run_dir), "--max-steps", str(max_steps), "--metrics-port", "0",
             "--set", "data.mode=once", "--set", f"series.warmup_points={WARMUP}", "--set", "series.window=64",
             "--set", f"series.lag={LAG}", "--set", f"series.batch_size={BATCH}", "--set", "series.history=96",
             "--set", "series.trials=4", "--set", "series.max_imfs=2", "--set", "series.processes=1",
             "--set", f"{method}.{'hidden' if method == 'forecast' else 'context_dim'}=16",
             "--set", "checkpoint.every_steps=2",
             # what this test checks is the resume; the gate would rightly keep step 2's forecaster (its rolling
             # nRMSE against persistence went 0.99 -> 1.11 -> 1.50 over these few steps when measured)
             "--set", "publish.gate=false"],
            capture_output=True, text=True, timeout=240)

    first = cli(3)
    assert first.returncode == 0, first.stderr[-2000:]
    second = cli(6)  # same run dir: resumes at step 3 and goes on to 6
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stderr
    manifest = json.loads((run_dir / "published" / "latest" / "manifest.json").read_text())
    assert manifest["method"] == method and manifest["step"] == 6
    assert load_encoder(run_dir / "published" / "latest")(torch.randn(2, 1, manifest["input"].get("lag", 64))).shape[0] == 2


def test_points_from_a_kafka_topic_train_resume_and_dead_letter(kafka_broker: Any, tmp_path: Path) -> None:
    topic = "series-points"
    values = _series(200)
    points = [(f"p{t}", json.dumps({"series_id": "m1", "timestamp": t, "value": float(v)}).encode(), [])
              for t, v in enumerate(values)]
    points[100:100] = [("bad-1", b'{"series_id": "m1", "timestamp": 99.5, "value": NaN}', []),
                       ("bad-2", b"not json at all", [])]
    create_topic(kafka_broker.bootstrap, topic, partitions=1)  # one partition: the points' order is the series'
    assert produce(kafka_broker.bootstrap, topic, points) == len(points)
    url = f"{kafka_broker.url(topic)}?group=series-g"
    steps = (200 - WARMUP) // BATCH  # every point after the warm-up makes one example

    first = SeriesJob(_config(tmp_path / "run", url, "forecast", f"train.max_steps={steps // 2}",
                              "kafka.session_timeout_ms=6000"))
    first.run()
    second = SeriesJob(_config(tmp_path / "run", url, "forecast", f"train.max_steps={steps}",
                               "kafka.session_timeout_ms=6000"))
    second.run()
    assert first.state.step == steps // 2 and second.state.step == steps and second.task.points_seen == 200
    letters = [json.loads(line) for line in (tmp_path / "run" / "dead-letter.jsonl").read_text().splitlines()]
    assert sorted((letter["key"], letter["reason"]) for letter in letters) == [("bad-1", "non_finite_value"),
                                                                                ("bad-2", "not_json")]
    # the group's committed offset is the last checkpoint's: every point (and both bad ones) is acknowledged
    assert second.checkpoint_state()["source"]["offsets"] == {"0": len(points)}
    assert KafkaSource(url).committed_offsets() == {0: len(points)}


# Records that once ended the job (the 400-digit timestamp: OverflowError, exit 2 on every restart) or could:
# each must be that record's dead letter, under its reason, and the job goes on.
POISON = [
    (b'{"series_id": "m1", "timestamp": ' + b"9" * 400 + b', "value": 1}', "bad_timestamp"),
    (b'{"series_id": "m1", "timestamp": "' + b"9" * 400 + b'", "value": 1}', "bad_timestamp"),
    (b'{"series_id": "m1", "timestamp": 1e999, "value": 1}', "bad_timestamp"),
    (b'{"series_id": "m1", "timestamp": 5, "value": ' + b"9" * 400 + b"}", "non_numeric_value"),
    (b'{"series_id": "m1", "timestamp": 5, "value": ' + b"9" * 5000 + b"}", "not_json"),
    (b'{"series_id": {"a": 1}, "timestamp": 5, "value": 1}', "missing_field"),
    (b'{"series_id": "\\ud800", "timestamp": 5, "value": 1}', "missing_field"),
    (b"{" + b'"a": {' * 50000 + b"}", "not_json"),
    (b"\xff\xfe\x00{", "not_json"),
]


def test_poison_records_on_kafka_are_dead_lettered_and_the_series_job_goes_on(kafka_broker: Any, tmp_path: Path) -> None:
    topic = "series-poison"
    values = _series(160)
    points = [(f"p{t}", json.dumps({"series_id": "m1", "timestamp": t, "value": float(v)}).encode(), [])
              for t, v in enumerate(values)]
    points[100:100] = [(f"poison-{index}", payload, []) for index, (payload, _) in enumerate(POISON)]
    create_topic(kafka_broker.bootstrap, topic, partitions=1)
    assert produce(kafka_broker.bootstrap, topic, points) == len(points)
    job = SeriesJob(_config(tmp_path / "run", f"{kafka_broker.url(topic)}?group=poison-g", "forecast",
                            f"train.max_steps={(160 - WARMUP) // BATCH}", "kafka.session_timeout_ms=6000"))
    state = job.run()
    assert state.step == (160 - WARMUP) // BATCH and job.task.points_seen == 160  # every good point, after them too
    letters = [json.loads(line) for line in (tmp_path / "run" / "dead-letter.jsonl").read_text().splitlines()]
    assert [(letter["key"], letter["reason"]) for letter in letters] == [
        (f"poison-{index}", reason) for index, (_, reason) in enumerate(POISON)]
    rejected = job.metrics.registry.get_sample_value("streamssl_records_rejected_total", {"reason": "bad_timestamp"})
    assert rejected == 3


def test_a_reject_from_the_feed_is_dead_lettered_by_the_loop_which_moves_past_it(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text("timestamp,value\n0,1\n1,x\n2,3\n")
    job = SeriesJob(_config(tmp_path / "run", tmp_path / "data"))
    try:
        messages = read_to_end(job.task.open(None), timeout=10)
    finally:
        job.task.close()
    reject = messages[1]
    assert isinstance(reject, Reject) and reject.position == SeriesFilePosition("a.csv", 2, 0, 0)
    assert job.receive(reject) == "" and job.state.position is reject.position
    letter = json.loads((tmp_path / "run" / "dead-letter.jsonl").read_text())
    assert (letter["key"], letter["reason"], letter["detail"]) == ("a.csv#1", "non_numeric_value", "'x'")


OLD_CHECKPOINT = Path(__file__).parents[2] / "fixtures" / "series-forecast-v1-ckpt-000000005.pt"


def _old_layout_config(run_dir: Path, data: Path, steps: int) -> Any:
    """The settings OLD_CHECKPOINT was written with."""
    cfg = load_config(sets=[
        f"run_dir={run_dir}", f"data.source={data}", "data.mode=once", "metrics.port=0", "train.max_minutes=0",
        "train.log_every_seconds=1000", "checkpoint.every_steps=5", "checkpoint.every_seconds=0",
        "series.warmup_points=64", "series.window=32", "series.lag=8", "series.batch_size=8", "series.eval_points=50",
        f"train.max_steps={steps}", "method=forecast", "forecast.mode=single", "forecast.hidden=16"])
    return cfg


def test_a_checkpoint_written_before_the_one_loop_resumes_exactly_where_a_straight_run_is(tmp_path: Path) -> None:
    # OLD_CHECKPOINT was written by the series job as it was before pipeline/loop.py (commit bb62cee): 5 steps
    # of the forecaster on the series below. Resumed by today's code it must continue where a straight run of
    # today's code is after 10 steps (bit for bit on the fixture's kind of CPU).
    t = np.arange(160)
    data = tmp_path / "series"
    data.mkdir()
    write_series_file(data / "part-000.parquet", t.astype(float), 5 + 2 * np.sin(t / 6.0))
    (tmp_path / "old" / "checkpoints").mkdir(parents=True)
    shutil.copy(OLD_CHECKPOINT, tmp_path / "old" / "checkpoints" / "ckpt-000000005.pt")
    resumed = SeriesJob(_old_layout_config(tmp_path / "old", data, 10))
    assert resumed.resume() and (resumed.state.step, resumed.task.points_seen) == (5, 104)
    resumed.run()
    straight = SeriesJob(_old_layout_config(tmp_path / "straight", data, 10))
    straight.run()
    assert resumed.state.step == straight.state.step == 10
    # The old checkpoint predates lineage tracking: the resumed run's lineage starts where it resumed (row 105),
    # the straight run's at its first point; everything the next step depends on is the same.
    old, new = _resumable_state(resumed), _resumable_state(straight)
    assert old.pop("first_source")["row"] > new.pop("first_source")["row"]
    # Floats bit for bit only on a CPU whose kernels round as the fixture's did (written on AVX2, not AVX-512).
    _assert_same(old, new, close=True)


def test_repeated_nan_in_a_series_run_rolls_back_and_the_stream_goes_on(tmp_path: Path) -> None:
    # A forecaster loss that turns NaN on demand cannot come from real points, so the model's forward is
    # wrapped to poison three calls; the loop's skip and rollback (the same as for images) are real.
    job = SeriesJob(_config(tmp_path / "run", _lake(tmp_path / "data", _series(300)), "forecast"))
    real_forward, calls = job.task.model.forward, {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        loss, logs = real_forward(*args)
        return (loss * float("nan"), logs) if 8 <= calls["n"] <= 10 else (loss, logs)

    job.task.model.forward = poisoned
    state = job.run()
    assert job.metrics.skipped_steps._value.get() == 3 and job.metrics.rollbacks._value.get() == 1
    # 29 full batches of 8 after the 64-point warm-up: 7 good steps, 3 poisoned, then the rollback to the
    # checkpoint of step 5 drops 2 good ones; the rest of the stream trains on.
    assert calls["n"] == (300 - WARMUP) // BATCH and state.step == calls["n"] - 3 - 2
    assert job.task.points_seen == 300
