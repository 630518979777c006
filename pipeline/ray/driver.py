"""The driver of a multi-worker run (`--workers N`, `--ray-address`, `ray+…://`): Ray Train's `TorchTrainer`
runs one `WorkerTrainer` (pipeline/ray/worker.py) per worker, restarts the group after a failure, relays a
stop request to every worker and re-raises, as itself, an error a restart would only repeat.

With a `ray+…` spec and no `--workers`, one trainer in this process reads the dataset through Ray Data.
"""


import contextlib
import dataclasses
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from streamssl.pipeline.config import Config, ConfigError, load_config, redacted, restore_secrets, secrets_of
from streamssl.pipeline.extras import require
from streamssl.pipeline.loading.sources import SourceSpec, resolve_mode, source_factory, source_spec
from streamssl.pipeline.loop import TrainingDiverged
from streamssl.pipeline.ray.cluster import cpus_per_worker, start_ray, stop_ray
from streamssl.pipeline.ray.feed import ray_dataset
from streamssl.pipeline.ray.worker import WorkerTrainer, rank_shard_spec
from streamssl.pipeline.rundir import RunDirError
from streamssl.streams.ray_source import MODES as RAY_MODES
from streamssl.streams.records import SourceError

log = logging.getLogger(__name__)


# Restarts of the worker group after a failure (a lost node, an OOM-killed worker); each resumes from the
# last checkpoint. Errors that would only repeat (bad config, bad data spec) end the run on the first one.
MAX_FAILURES = 3
RUN_NAME = "streamssl"  # Ray Train run name: fixed, so a rerun on the same run dir finds its Ray checkpoints
_EXPECTED_ERRORS = (ConfigError, SourceError, TrainingDiverged, RunDirError)


class _RunControl:
    """Shared by the driver and the workers (as a Ray actor): the stop request, an error a restart would repeat, and
    the config's secrets (in memory: the config that Ray stores with the run has them emptied)."""

    def __init__(self, secrets: dict[str, str] | None = None) -> None:
        self._stop = False
        self._error: tuple[str, str] | None = None
        self._secrets = dict(secrets or {})

    def secrets(self) -> dict[str, str]:
        return self._secrets

    def request_stop(self) -> None:
        self._stop = True

    def stop_requested(self) -> bool:
        return self._stop

    def fail(self, kind: str, message: str) -> None:
        if self._error is None:
            self._error = (kind, message)

    def error(self) -> tuple[str, str] | None:
        return self._error


def _watch_stop(control: Any, stop: threading.Event, done: threading.Event) -> None:
    """Worker side of a stop request (the driver's Ctrl-C / SIGTERM): sets the trainer's stop event."""
    import ray

    while not done.wait(1.0):
        with contextlib.suppress(Exception):  # the driver gone: Ray ends this worker anyway
            if ray.get(control.stop_requested.remote(), timeout=10):
                stop.set()
                return


def _train_worker(config: dict[str, Any]) -> None:
    """Ray Train's `train_loop_per_worker`: one WorkerTrainer, resumed from the run dir or Ray's checkpoint."""
    import ray
    import ray.train
    import ray.train.torch

    control = config["control"]
    if ray.get(control.error.remote()) is not None:
        return  # a restart after an error that would only repeat: the driver reports it
    logging.getLogger("streamssl").setLevel(logging.INFO)  # resumes, checkpoints, publishes (Ray's level is higher)
    cfg = load_config(overrides=config["config"])
    restore_secrets(cfg, ray.get(control.secrets.remote()))
    if torch.cuda.is_available() and cfg.train.device != "cpu":
        torch.cuda.set_device(ray.train.torch.get_device())  # "cuda" then means this worker's GPU
    iterator = ray.train.get_dataset_shard("train") if source_spec(cfg.data).kind == "ray" else None
    stop, done = threading.Event(), threading.Event()
    threading.Thread(target=_watch_stop, args=(control, stop, done), name="streamssl-stop", daemon=True).start()
    try:
        WorkerTrainer(cfg, stop, data_iterator=iterator, ray_session=True).run()
    except _EXPECTED_ERRORS as err:
        ray.get(control.fail.remote(type(err).__name__, str(err)))
        raise
    finally:
        done.set()


def _absolute(cfg: Config, spec: SourceSpec) -> Config:
    """The config with absolute run dir and data paths: Ray Train workers run in a directory of their own."""
    source = spec.text
    if spec.kind == "ray":
        source = f"ray+{spec.ray_format}://{spec.path}"  # the spec's local path is absolute already
    elif spec.is_local:
        source = os.path.abspath(source)
    return dataclasses.replace(cfg, run_dir=os.path.abspath(cfg.run_dir), data=dataclasses.replace(cfg.data, source=source))



def run_distributed(cfg: Config, workers: int = 0, ray_address: str = "", stop: threading.Event | None = None) -> None:
    """Trains `cfg` on `workers` Ray Train workers, or (0) in this process from a `ray+…` spec.

    Args:
        cfg: The run's config (run dir, data spec, …), the same for every worker.
        workers: Ray Train workers (DDP); 0 runs one trainer here, which needs a `ray+…` data spec.
        ray_address: An existing cluster (`auto`, `ray://host:10001`, …); "" starts a local Ray for this run.
        stop: Set (e.g. by a signal handler) to stop every worker after its current step, with the usual
            checkpoint and publish.

    Raises:
        ConfigError, SourceError, TrainingDiverged: as a single-process run raises them, from whichever
            worker met them.
    """
    if workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {workers}")
    spec = source_spec(cfg.data)  # also: a malformed spec or a missing Ray Data path fails here, before Ray starts
    what = spec.text.split("://")[0] + "://" if spec.kind == "ray" else "--workers / --ray-address"
    for module in ("ray.data", "ray.train"):  # the ray extra: one line now rather than a traceback from a worker
        require(module, "ray", what)
    if workers == 0 and spec.kind != "ray":
        raise ConfigError("without --workers, only a ray+webdataset:// / ray+parquet:// / ray+images:// spec runs on Ray")
    cfg = _absolute(cfg, spec)
    if spec.kind == "ray" and resolve_mode(spec, cfg.data.mode) not in RAY_MODES:
        raise ConfigError(f"data.mode {cfg.data.mode} is not available for Ray Data sources; use {' or '.join(RAY_MODES)}")
    if workers > 1 and spec.kind not in ("ray", "kafka"):
        rank_shard_spec(source_factory(cfg.data, cfg.train.seed, cfg.kafka).args[0],  # refused before Ray starts
                        resolve_mode(spec, cfg.data.mode), workers - 1, workers, cfg.data.s3_endpoint)
    stop = stop or threading.Event()
    temp_dir = start_ray(ray_address, workers)
    try:
        if workers == 0:
            WorkerTrainer(cfg, stop, data_iterator=ray_dataset(cfg).iterator()).run()
        else:
            fit_on_ray(cfg, workers, stop, cpus_per_worker=cpus_per_worker(workers))
    finally:
        stop_ray(temp_dir)



def fit_on_ray(cfg: Config, workers: int, stop: threading.Event, train_loop: Callable[[dict[str, Any]], None] | None = None,
               loop_config: dict[str, Any] | None = None, cpus_per_worker: int = 1) -> None:
    """One Ray Train run of `train_loop` (default: a WorkerTrainer per worker) on `workers` workers; Ray must be up.

    `train_loop` gets {"config": the config as a dict without its secrets (`control.secrets` has them), "control":
    the run's control actor, **loop_config} (benchmarks pass their own loop).
    """
    import ray
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # else every progress line reaches the driver twice
    device = cfg.train.device
    use_gpu = device.startswith("cuda") or (device == "auto" and ray.cluster_resources().get("GPU", 0) >= workers)
    # Any, like the handle `_raise_worker_error` takes: Ray types an actor's methods only where they are @ray.method.
    control: Any = ray.remote(num_cpus=0)(_RunControl).remote(secrets_of(cfg))
    ingest = ExecutionOptions(preserve_order=True)  # deterministic split and order: resuming by row count needs it
    trainer = TorchTrainer(
        train_loop or _train_worker, train_loop_config={"config": redacted(cfg), "control": control, **(loop_config or {})},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name=RUN_NAME, storage_path=str(Path(cfg.run_dir) / "ray"),
                             failure_config=FailureConfig(max_failures=MAX_FAILURES),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep)),
        datasets={"train": ray_dataset(cfg)} if source_spec(cfg.data).kind == "ray" else None,
        dataset_config=DataConfig(execution_options=ingest))
    finished = threading.Event()

    def relay_stop() -> None:
        while not finished.wait(0.2):
            if stop.is_set():
                control.request_stop.remote()
                return

    threading.Thread(target=relay_stop, name="streamssl-stop-relay", daemon=True).start()
    try:
        trainer.fit()
    except TrainingFailedError:
        _raise_worker_error(control)
        raise
    finally:
        finished.set()
    _raise_worker_error(control)


def _raise_worker_error(control: Any) -> None:
    """Re-raises, as itself, an expected error a worker met (bad config or data, divergence)."""
    import ray

    error = ray.get(control.error.remote())
    if error is not None:
        kind, message = error
        raise {cls.__name__: cls for cls in _EXPECTED_ERRORS}[kind](message) from None
