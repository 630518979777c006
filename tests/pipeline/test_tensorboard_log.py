"""TensorBoard event files (`log.tensorboard`, pipeline/tensorboard_log.py): real runs read back with TensorBoard's
own EventAccumulator, against the run's metrics.jsonl, across a resume, a crash, a SIGTERM and an exception."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from streamssl.pipeline.cli import main
from streamssl.pipeline.config import ConfigError, load_config
from streamssl.pipeline.config_show import describe
from streamssl.pipeline.history import History, read_history
from streamssl.pipeline.images import Trainer
from streamssl.pipeline.loop import TrainingDiverged
from streamssl.pipeline.ray.worker import WorkerTrainer
from streamssl.pipeline.run_state import RunState
from streamssl.pipeline.sections import LogConfig
from streamssl.pipeline.series.job import SeriesJob
from tests.conftest import free_port, tiny_config, tiny_sets
from tests.pipeline.series.test_forecast_cli import cli
from tests.pipeline.series.test_forecast_cli import sets as forecast_sets
from tests.pipeline.series.test_job import _config as series_config
from tests.pipeline.series.test_job import _lake as series_lake
from tests.pipeline.series.test_job import _series
from tests.pipeline.test_cli import _sigterm_while_training

ON = ("log.tensorboard=true", "train.log_every_seconds=0")  # a progress record at every step
# The cheapest kNN monitor (as tests/pipeline/test_history.py) and drift windows that are full by step 2.
KNN = ("eval.dataset=fashion-mnist", "eval.bank_size=300", "eval.test_size=100", "eval.every_steps=2",
       "drift.window=32", "drift.folds=2")


def scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag's (step, value) points, as TensorBoard reads the folder's event files."""
    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(point.step, point.value) for point in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def as_logged(rows: list[dict], kind: str, name: str) -> list[tuple[int, float]]:
    """The (step, value) points of `name` in the history's `kind` rows, as float32 (a TensorBoard scalar's type)."""
    return [(row["step"], float(np.float32(row[name]))) for row in rows if row["kind"] == kind and row.get(name) is not None]


def test_a_run_writes_its_progress_eval_and_publish_values_at_their_steps(
        tmp_path: Path, small_lake: Path, one_thread: None) -> None:
    run_dir = tmp_path / "run"
    state = Trainer(tiny_config(run_dir, small_lake, *ON, *KNN, "train.max_steps=4")).run()
    found, rows = scalars(run_dir / "tensorboard"), read_history(run_dir / "metrics.jsonl")
    assert {"progress/loss", "progress/lr", "progress/samples_per_second", "progress/input_wait_share",
            "progress/queue_fill", "eval/knn_top1", "eval/drift_auc", "publish/version"} <= set(found)
    assert [step for step, _ in found["progress/loss"]] == [1, 2, 3, 4] and state.step == 4
    for kind, name in [("progress", "loss"), ("progress", "lr"), ("progress", "input_wait_share"),
                       ("eval", "knn_top1"), ("eval", "drift_auc"), ("publish", "version")]:
        assert found[f"{kind}/{name}"] == as_logged(rows, kind, name), name
    assert [step for step, _ in found["eval/knn_top1"]] == [2, 4]
    assert found["publish/version"] == [(2, 1.0), (4, 2.0)]
    assert all(0 < lr < 0.1 for _, lr in found["progress/lr"])  # the progress line's LR, not a placeholder


def test_a_resume_continues_the_steps_and_a_crash_hides_what_its_lost_steps_logged(
        tmp_path: Path, small_lake: Path, one_thread: None) -> None:
    run_dir = tmp_path / "run"
    Trainer(tiny_config(run_dir, small_lake, *ON, "train.max_steps=5")).run()  # checkpoints at 2, 4 and 5
    first = read_history(run_dir / "metrics.jsonl")
    # Stands in for a crash after step 5 was logged and published but before its checkpoint was durable (a kill -9
    # in that window cannot be timed in a test): the checkpoint is not there, so the next start resumes from 4.
    (run_dir / "checkpoints" / "ckpt-000000005.pt").unlink()
    Trainer(tiny_config(run_dir, small_lake, *ON, "train.max_steps=7")).run()
    second = read_history(run_dir / "metrics.jsonl")[len(first):]
    found = scalars(run_dir / "tensorboard")
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # appended, not rewritten
    assert [row["step"] for row in second if row["kind"] == "progress"] == [5, 6, 7]
    # one curve from step 1 to 7: what the first run logged up to the checkpoint, then the resumed run's
    kept = [row for row in first if row["step"] <= 4] + second
    assert [step for step, _ in found["progress/loss"]] == [1, 2, 3, 4, 5, 6, 7]
    for kind, name in [("progress", "loss"), ("progress", "lr"), ("publish", "version")]:
        assert found[f"{kind}/{name}"] == as_logged(kept, kind, name), name
    assert [step for step, _ in found["publish/version"]] == [2, 4, 6, 7]  # the lost lineage's version at 5 hidden


def test_off_by_default_no_event_files(tmp_path: Path, small_lake: Path, one_thread: None) -> None:
    cfg = tiny_config(tmp_path / "run", small_lake, "train.max_steps=1", "train.log_every_seconds=0")
    assert cfg.log == LogConfig() and not cfg.log.tensorboard
    trainer = Trainer(cfg)
    trainer.run()
    assert trainer.history.tensorboard is None and (tmp_path / "run" / "metrics.jsonl").is_file()
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_only_an_enabled_history_writes_event_files(tmp_path: Path) -> None:
    """Ranks other than 0 have a disabled history (pipeline/loop.py): nothing of theirs reaches TensorBoard."""
    other_rank = History(tmp_path / "metrics.jsonl", enabled=False, log_cfg=LogConfig(tensorboard=True))
    other_rank.append("progress", RunState(step=1), {"loss": 1.0})
    other_rank.close()
    assert other_rank.tensorboard is None and not list(tmp_path.iterdir())
    rank_zero = History(tmp_path / "metrics.jsonl", log_cfg=LogConfig(tensorboard=True, tensorboard_dir="tb"))
    rank_zero.append("progress", RunState(step=1), {"loss": 1.0, "lr": float("nan"), "note": "text"})
    rank_zero.close()
    assert scalars(tmp_path / "tb") == {"progress/loss": [(1, 1.0)]}  # finite numbers only


def test_rollbacks_hide_the_steps_they_undo_and_the_exception_that_ends_the_run_closes_the_file(
        tmp_path: Path, small_lake: Path, one_thread: None) -> None:
    # A learning rate that diverges within three steps: each rollback to the checkpoint of step 2 retrains step 3,
    # until the rollbacks run out and the run raises.
    run_dir = tmp_path / "run"
    diverging = Trainer(tiny_config(run_dir, small_lake, *ON, "optim.lr=1.0e+12", "optim.warmup_steps=0",
                                    "train.nan_rollback_after=1"))
    with pytest.raises(TrainingDiverged):
        diverging.run()
    logged = as_logged(read_history(run_dir / "metrics.jsonl"), "progress", "loss")
    assert [step for step, _ in logged] == [1, 2, 3, 3, 3, 3]  # step 3 trained once, then after each rollback
    assert scalars(run_dir / "tensorboard")["progress/loss"] == sorted(dict(logged).items())  # the last of each step
    assert diverging.history.tensorboard is not None and diverging.history.tensorboard._writer is None  # closed


def _worker(worker: int, port: int, lake: str, run_dir: str) -> None:
    """One of two DDP workers (real gloo collectives, as --workers 2 runs them under Ray Train) on one run dir."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=worker, world_size=2)
    try:
        WorkerTrainer(tiny_config(Path(run_dir), Path(lake), *ON, "train.max_steps=3")).run()
        (Path(run_dir) / f"pid-{worker}").write_text(str(os.getpid()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes that each load torch and train: ~37 s on 2 busy cores
def test_only_rank_0_of_two_workers_writes_event_files(tmp_path: Path, small_lake: Path) -> None:
    run_dir = tmp_path / "run"
    mp.spawn(_worker, args=(free_port(), str(small_lake), str(run_dir)), nprocs=2, join=True)
    files = list((run_dir / "tensorboard").iterdir())
    rank_zero = (run_dir / "pid-0").read_text()
    assert len(files) == 1 and files[0].name.split(".")[-2] == rank_zero  # events.out.tfevents.TIME.HOST.PID.N
    found, rows = scalars(run_dir / "tensorboard"), read_history(run_dir / "metrics.jsonl")
    assert found["progress/loss"] == as_logged(rows, "progress", "loss") and len(found["progress/loss"]) == 3
    assert [step for step, _ in found["publish/version"]] == [2, 3]


def test_a_sigterm_stop_closes_the_event_file(tmp_path: Path, small_lake: Path) -> None:
    run_dir = tmp_path / "run"
    returncode, _, stderr, _ = _sigterm_while_training(run_dir, small_lake, "--set", "eval.dataset=none",
                                                       "--set", "log.tensorboard=true")
    assert returncode == 0 and "SIGTERM received" in stderr, stderr
    found, rows = scalars(run_dir / "tensorboard"), read_history(run_dir / "metrics.jsonl")
    # everything up to the final publish is in the event file once the signalled process has exited
    assert found["publish/version"] == as_logged(rows, "publish", "version") != []
    assert found["progress/loss"] == as_logged(rows, "progress", "loss") != []


def test_an_unwritable_event_dir_is_one_warning_and_the_run_goes_on(
        tmp_path: Path, small_lake: Path, one_thread: None, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("not a folder")
    state = Trainer(tiny_config(tmp_path / "run", small_lake, *ON, f"log.tensorboard_dir={tmp_path / 'file' / 'tb'}",
                                "train.max_steps=2")).run()
    assert state.step == 2 and (tmp_path / "run" / "published" / "latest").exists()
    warnings = [r.getMessage() for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert len(warnings) == 1 and "the run goes on without them" in warnings[0]


def test_the_series_job_writes_its_loss_and_rolling_nrmse(tmp_path: Path, one_thread: None) -> None:
    run_dir = tmp_path / "run"
    cfg = series_config(run_dir, series_lake(tmp_path / "data", _series(160)), "forecast", *ON, "train.max_steps=3",
                        "eval.every_steps=3")
    SeriesJob(cfg).run()
    found, rows = scalars(run_dir / "tensorboard"), read_history(run_dir / "metrics.jsonl")
    assert found["progress/loss"] == as_logged(rows, "progress", "loss") and len(found["progress/loss"]) == 3
    assert found["eval/rolling_nrmse"] == as_logged(rows, "eval", "rolling_nrmse") != []
    assert "progress/points_per_second" in found  # the progress line's own values


def test_streamssl_forecast_writes_its_loss_and_validation_checks(tmp_path: Path, one_thread: None,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "series.csv"
    csv.write_text("timestamp,value\n" + "".join(f"{t},{value}\n" for t, value in enumerate(_series(200))))
    run_dir = tmp_path / "run"
    cli(["forecast", "--series", str(csv), "--lag", "4", "--max-steps", "20", "--run-dir", str(run_dir),
         *forecast_sets(tmp_path / "cache", *ON, "series.window=16", "series.trials=2")], capsys)
    found, rows = scalars(run_dir / "tensorboard"), read_history(run_dir / "metrics.jsonl")
    assert found["progress/loss"] == as_logged(rows, "progress", "loss") and len(found["progress/loss"]) == 20
    evals = {f"eval/{name}" for row in rows if row["kind"] == "eval" for name, value in row.items()
             if isinstance(value, float) and name not in ("time", "step", "samples_seen")}
    assert evals and evals <= set(found), evals
    assert [step for step, _ in found["publish/version"]] == [20]


@pytest.mark.parametrize(("sets", "message"), [
    (["log.tensorboard=maybe"], "log.tensorboard: expected true/false, got 'maybe'"),
    (["log.tensorboard_dir=tb"], "log.tensorboard_dir is set but log.tensorboard is false"),
])
def test_a_bad_setting_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], sets: list[str],
                                          message: str) -> None:
    run_dir = tmp_path / "run"
    argv = ["run", "--run-dir", str(run_dir), "--metrics-port", "0", *[arg for item in sets for arg in ("--set", item)]]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(f"streamssl: error: {message}")
    assert not run_dir.exists()


def test_forecast_without_a_run_dir_needs_an_absolute_event_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="without --run-dir keeps nothing"):
        load_config(sets=["log.tensorboard=true"], job="forecast")
    cfg = load_config(sets=["log.tensorboard=true", f"log.tensorboard_dir={tmp_path}"], job="forecast")
    assert cfg.log.tensorboard_dir == str(tmp_path)


def test_every_job_shows_the_keys_with_their_help() -> None:
    for method, job in [("moco", "images"), ("forecast", "series"), ("forecast", "forecast")]:
        shown = [line for line in describe(method, job) if line.startswith("log.")]
        assert [line.split(" = ")[0] for line in shown] == ["log.tensorboard", "log.tensorboard_dir"], job
        assert all("  # " in line and len(line.split("  # ")[1]) > 20 for line in shown)


def test_a_missing_tensorboard_package_is_one_line(tmp_path: Path, small_lake: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated: the package is installed here (the test venv has every extra). None in sys.modules makes Python
    answer `import tensorboard` as it answers the import of an absent package (ModuleNotFoundError naming it);
    tests/test_packaging.py checks the same line in a fresh process that cannot find the package at all."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ConfigError) as error:
        tiny_config(tmp_path / "api", small_lake, "log.tensorboard=true")
    assert str(error.value) == "log.tensorboard needs 'pip install streamssl[tensorboard]'"
    run_dir = tmp_path / "cli"
    assert main(["run", *[arg for item in tiny_sets(run_dir, small_lake, "log.tensorboard=true")
                          for arg in ("--set", item)]]) == 2
    assert capsys.readouterr().err == "streamssl: error: log.tensorboard needs 'pip install streamssl[tensorboard]'\n"
    assert not run_dir.exists()  # refused before the run dir is made
    assert tiny_config(tmp_path / "off", small_lake).log.tensorboard is False  # off, the package is not needed
