"""Training on several workers with Ray Train, and Ray Data sources (`--workers N`, `--ray-address`, `ray+…://`).

`run_distributed` starts a local Ray (or joins a cluster) and runs the ordinary trainer on every worker
of a Ray Train `TorchTrainer`: DDP averages the gradients (gloo on CPU, NCCL on GPU), and the methods
gather what they store (queues, banks, buffers) from all workers (models/distributed.py). Each worker
reads its own share of the stream: a `streaming_split` shard of a Ray dataset, the Kafka partitions p
with p % N == rank (self-assigned, offsets committed for the one group), or every N-th shard of a local
webdataset lake.

Workers must take the same decisions at the same step, or a collective waits forever. So the per-rank
choices of the loop are agreed on: whether to stop (a stop request, the time budget, the end of one
worker's stream), whether a checkpoint is due by time, and whether the loss is finite (its mean over
workers). Rank 0 alone evaluates, publishes and writes checkpoints; the checkpoint holds every worker's
stream position and RNG state, gathered to rank 0, and each worker resumes from its own. After writing,
the checkpoint is also reported to Ray Train (`ray.train.report`), so that a restart by `FailureConfig`,
possibly on other nodes, resumes from it.

With a `ray+…` spec and no `--workers`, one trainer in this process reads the dataset through Ray Data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import inspect
import json
import logging
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from braceexpand import braceexpand

from streamssl.models.distributed import rank, world_size
from streamssl.pipeline.checkpoint import Checkpointer
from streamssl.pipeline.config import Config, ConfigError, load_config, to_dict
from streamssl.pipeline.data import resolve_mode, source_factory
from streamssl.pipeline.loader import Batch
from streamssl.pipeline.ray_feed import RayDataFeed, ray_dataset
from streamssl.pipeline.trainer import Trainer, TrainingDiverged
from streamssl.streams.ray_source import MODES as RAY_MODES
from streamssl.streams.ray_source import is_ray_spec, parse_ray_spec
from streamssl.streams.records import SourceError
from streamssl.streams.webdataset_source import list_complete_shards

log = logging.getLogger(__name__)

# Restarts of the worker group after a failure (a lost node, an OOM-killed worker); each resumes from the
# last checkpoint. Errors that would only repeat (bad config, bad data spec) end the run on the first one.
MAX_FAILURES = 3
RUN_NAME = "streamssl"  # Ray Train run name: fixed, so a rerun on the same run dir finds its Ray checkpoints
_EXPECTED_ERRORS = (ConfigError, SourceError, TrainingDiverged)


# --- local webdataset lakes: every N-th shard per worker ------------------------------------------------
def rank_shard_spec(spec: str, mode: str, worker: int, workers: int) -> str:
    """A webdataset spec naming this worker's shards: every `workers`-th one of the lake, from `worker`.

    Follow mode reads a lake that keeps growing in name order; shards that land later cannot be dealt
    out in advance, so it is refused (Kafka or a `ray+webdataset://` spec split the stream instead).
    """
    if mode == "follow":
        raise ConfigError("data.mode follow (the default for a lake directory) cannot be split across workers; "
                          "use --set data.mode=cycle or once, a ray+webdataset:// spec, or a Kafka topic")
    shards = list_complete_shards(spec) if os.path.isdir(spec) else list(braceexpand(spec))
    mine = shards[worker::workers]
    if not mine:
        raise ConfigError(f"{spec} has {len(shards)} shard(s), fewer than the {workers} workers")
    if any(char in path for path in mine for char in "{},"):
        raise ConfigError(f"shard paths with braces or commas cannot be split across workers: {mine[0]}")
    return mine[0] if len(mine) == 1 else "{" + ",".join(mine) + "}"


# --- checkpoints: rank 0 writes, every rank reads its own part ------------------------------------------
def _merged_kafka(positions: list[dict[str, Any]]) -> dict[str, Any]:
    """All workers' Kafka positions as one: a run resumed with another worker count splits the partitions
    differently, so every worker gets the newest offset known for each partition (offsets only grow) and
    uses the ones it reads. {} if no worker had read anything yet."""
    kafka = [position for position in positions if position.get("kind") == "kafka"]
    offsets: dict[str, int] = {}
    for position in kafka:
        for partition, offset in position.get("offsets", {}).items():
            offsets[partition] = max(offsets.get(partition, 0), int(offset))
    return {**kafka[0], "offsets": offsets} if kafka else {}


class SharedCheckpointer(Checkpointer):
    """The run dir's checkpoints for a group of workers (our own format; see pipeline/checkpoint.py).

    `save` is collective: rank 0 writes, then every rank waits for the write to be durable (a Kafka
    worker may then commit its offsets) and, inside Ray Train, reports the checkpoint to Ray. A
    checkpoint carries `ranks`: every worker's stream position and RNG state; `load_latest` returns the
    checkpoint as this rank should restore it, and prefers Ray's latest checkpoint when that is newer
    (after a restart on a node that cannot see the run dir's newest file).
    """

    def __init__(self, directory: Path, keep: int, worker: int, workers: int, ray_session: bool) -> None:
        super().__init__(directory, keep)
        self.worker, self.workers, self.ray_session = worker, workers, ray_session

    def save(self, state: dict[str, Any], step: int) -> Path:
        path = super().save(state, step) if self.worker == 0 else self.directory / f"ckpt-{step:09d}.pt"
        if self.workers > 1:
            dist.barrier()
        if self.ray_session:
            self._report(path, state)
        return path

    def _report(self, path: Path, state: dict[str, Any]) -> None:
        import ray.train

        metrics = {"step": state["step"], "samples_seen": state["samples_seen"]}
        if self.worker != 0:
            ray.train.report(metrics)  # a barrier in Ray Train: every worker reports
            return
        folder = Path(tempfile.mkdtemp(prefix=".ray-report-", dir=self.directory))
        try:
            try:
                os.link(path, folder / path.name)  # no copy where Ray's storage copies it anyway
            except OSError:
                shutil.copy2(path, folder / path.name)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                             checkpoint_dir_name=f"{path.stem}-{state['checkpoints_written']}")
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path] | None:
        found = super().load_latest(map_location)
        if self.ray_session:
            reported = self._load_reported(map_location)
            if reported is not None and (found is None or reported[0]["step"] > found[0]["step"]):
                found = reported
        if found is None:
            return None
        ckpt, path = found
        return self.rank_view(ckpt), path

    @staticmethod
    def _load_reported(map_location: str | torch.device) -> tuple[dict[str, Any], Path] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            files = sorted(Path(folder).glob("ckpt-*.pt"))
            if not files:
                return None
            return torch.load(files[-1], map_location=map_location, weights_only=True), files[-1]

    def rank_view(self, ckpt: dict[str, Any]) -> dict[str, Any]:
        """`ckpt` with this worker's own stream position and RNG states in place of rank 0's."""
        ranks = ckpt.get("ranks") or [{"position": ckpt["source"], "rng": ckpt["rng"]}]  # a single-process run's
        if len(ranks) != self.workers:
            raise ConfigError(f"the run dir's checkpoint was written by {len(ranks)} worker(s), this run has "
                              f"{self.workers}: resume with the same number of workers, or use a new --run-dir")
        position = ranks[self.worker]["position"]
        if any(entry["position"].get("kind") == "kafka" for entry in ranks):
            position = _merged_kafka([entry["position"] for entry in ranks])
        return {**ckpt, "source": position, "rng": ranks[self.worker]["rng"]}


# --- the trainer each worker runs -----------------------------------------------------------------------
def _rank_seed(seed: int, worker: int) -> int:
    """Augmentation seed of a worker: rank 0 keeps the run's seed (one worker trains like a plain run)."""
    if worker == 0:
        return seed
    return int.from_bytes(hashlib.blake2b(f"augment:{seed}:{worker}".encode(), digest_size=7).digest(), "little")


def parameters_sha256(module: torch.nn.Module) -> str:
    """A digest of a module's parameters: equal on every worker as long as DDP keeps them in step."""
    digest = hashlib.sha256()
    for name, parameter in sorted(module.named_parameters()):
        digest.update(name.encode())
        digest.update(parameter.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


class WorkerTrainer(Trainer):
    """The trainer of one worker in a group (torch.distributed initialised), or of a single Ray Data run.

    Args:
        cfg: The run's config; `train.batch_size` is per worker, so the global batch is workers x batch_size
            and the learning rate scales with it (linear scaling rule).
        stop: Set to stop after the current step (all workers stop at the same step).
        data_iterator: The Ray Data iterator this worker reads, for a `ray+…` spec.
        ray_session: Inside Ray Train: report checkpoints to it and resume from its latest.
    """

    def __init__(self, cfg: Config, stop: threading.Event | None = None, *, data_iterator: Any = None,
                 ray_session: bool = False) -> None:
        super().__init__(cfg, stop)
        self.workers, self.worker = world_size(), rank()
        self.base_lr *= self.workers
        self.generator.manual_seed(_rank_seed(cfg.train.seed, self.worker))
        if self.worker != 0:  # config.yaml is written already; only rank 0 serves metrics
            self.cfg = dataclasses.replace(cfg, metrics=dataclasses.replace(cfg.metrics, port=0))
        self.checkpointer = SharedCheckpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep, self.worker,
                                               self.workers, ray_session)
        self.data_iterator = data_iterator
        if is_ray_spec(cfg.data.source):
            if data_iterator is None:
                raise ConfigError(f"{cfg.data.source} is read by Ray Data: start it with run_distributed")
        elif self.workers > 1 and cfg.data.source.startswith("kafka://"):
            # Every worker reads its own fixed share of the partitions and commits offsets for the one group.
            self.make_source = functools.partial(self.make_source, split=(self.worker, self.workers))
        elif self.workers > 1:
            spec = rank_shard_spec(self.make_source.args[0], resolve_mode(cfg.data.source, cfg.data.mode),
                                   self.worker, self.workers)
            self.make_source = source_factory(dataclasses.replace(cfg.data, source=spec), cfg.train.seed, cfg.kafka)
        self._collective_device = self.device if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu"
        if self.workers > 1:
            # Buffers are not broadcast: the gathered queues and banks are equal on every worker by construction,
            # and broadcasting NPID's bank every step would cost 64 MiB. Unused parameters: only SwAV has
            # them (its prototypes are detached while frozen); looking for them costs a graph walk per step.
            ddp = torch.nn.parallel.DistributedDataParallel
            no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                              else {"broadcast_buffers": False})  # the older name (torch < 2.14)
            self.forward_module = ddp(self.method, device_ids=[torch.cuda.current_device()] if self.device.type == "cuda"
                                      else None, find_unused_parameters=cfg.method == "swav", **no_buffer_sync)
        self._held: Batch | None = None

    # --- agreement between workers -----------------------------------------------------------------------
    def _max_over_workers(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.tolist()

    def loss_value(self, loss: torch.Tensor) -> float:
        """The mean loss over workers: non-finite on one worker makes every worker skip the step."""
        if self.workers == 1:
            return super().loss_value(loss)
        total = loss.detach().float().reshape(1).to(self._collective_device)
        dist.all_reduce(total)
        return float(total) / self.workers

    def agree_horizon(self, horizon: int, frozen: bool) -> tuple[int, bool]:
        """The smallest estimate of any worker, frozen once every worker's is: the same LR on every worker."""
        if self.workers == 1:
            return horizon, frozen
        negative_horizon, not_frozen = self._max_over_workers([-float(horizon), float(not frozen)])
        return int(-negative_horizon), not_frozen == 0

    def checkpoint_due(self, seconds_since_checkpoint: float) -> bool:
        due = super().checkpoint_due(seconds_since_checkpoint)
        if self.workers == 1 or not self.cfg.checkpoint.every_seconds:
            return due  # by steps alone, every worker decides the same
        return bool(self._max_over_workers([float(due)])[0])

    def next_batch(self, loader: Any, deadline: float) -> tuple[Batch | None, str]:
        """Rounds until every worker holds a batch (train) or any worker has to stop (all stop).

        A worker that has no batch yet still joins each round, so a worker never waits in a collective
        for one that waits for data. A `streaming_split` pass starts only when every worker asks for it:
        when one worker's reader waits there, all others read to the end of their pass (`drain`) instead
        of holding back behind a full prefetch queue.
        """
        if self.workers == 1:
            return super().next_batch(loader, deadline)
        while True:
            reason = self.stop_reason(deadline)
            if self._held is None and not reason:
                waited = time.perf_counter()
                with contextlib.suppress(queue.Empty):
                    self._held = loader.next(timeout=0.5)
                    reason = "" if self._held is not None else "stream ended"
                self.metrics.wait_seconds.inc(time.perf_counter() - waited)
            waiting = bool(getattr(loader, "waiting_for_pass", False))
            stop_any, missing_any, waiting_any = self._max_over_workers(
                [float(bool(reason)), float(self._held is None), float(waiting)])
            if stop_any:
                return None, reason or "another worker stopped"
            if waiting_any and hasattr(loader, "drain"):
                loader.drain()
            if not missing_any:
                batch, self._held = self._held, None
                return batch, ""

    # --- rank 0 evaluates, publishes, prints; checkpoints hold every worker's position -------------------
    def checkpoint_state(self) -> dict[str, Any]:
        state = super().checkpoint_state()
        mine = {"position": state["source"], "rng": state["rng"]}
        ranks: list[Any] = [mine]
        if self.workers > 1:
            ranks = [None] * self.workers
            dist.all_gather_object(ranks, mine)
        state.update(ranks=ranks, world_size=self.workers)
        return state

    def open_loader(self) -> Any:
        if self.data_iterator is not None:
            return RayDataFeed(self.data_iterator, self.state.position, self.cfg, self.dead_letters)
        return super().open_loader()

    def train_step(self, batch: Batch) -> tuple[float, dict[str, float]] | None:
        result = super().train_step(batch)
        if result is not None:  # the loop counts this worker's batch; the other workers' equal batches here
            self.state.samples_seen += (self.workers - 1) * batch.images.shape[0]
        return result

    def evaluate(self) -> None:
        if self.worker == 0:
            super().evaluate()

    def publish(self) -> None:
        if self.worker == 0:
            super().publish()
        else:
            self.state.published_step = self.state.step

    def print_progress(self, rate: float, loss: float, logs: dict[str, float]) -> None:
        if self.worker == 0:
            super().print_progress(rate, loss, logs)

    def finish(self, reason: str) -> None:
        super().finish(reason)
        summary = {"rank": self.worker, "world_size": self.workers, "step": self.state.step,
                   "samples_seen": self.state.samples_seen, "position": _plain(self.state.position),
                   "parameters_sha256": parameters_sha256(self.method)}
        folder = self.run_dir / "workers"
        folder.mkdir(exist_ok=True)
        (folder / f"rank-{self.worker}.json").write_text(json.dumps(summary) + "\n")


def _plain(position: dict[str, Any]) -> dict[str, Any]:
    """The JSON-friendly part of a position for the worker summary (no shuffle-buffer records)."""
    return {key: value for key, value in position.items() if isinstance(value, str | int | float | dict)}


# --- Ray: the driver and the workers' entry point -------------------------------------------------------
class _RunControl:
    """Shared by the driver and the workers (as a Ray actor): the stop request, and an error a restart would repeat."""

    def __init__(self) -> None:
        self._stop = False
        self._error: tuple[str, str] | None = None

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
    if torch.cuda.is_available() and cfg.train.device != "cpu":
        torch.cuda.set_device(ray.train.torch.get_device())  # "cuda" then means this worker's GPU
    iterator = ray.train.get_dataset_shard("train") if is_ray_spec(cfg.data.source) else None
    stop, done = threading.Event(), threading.Event()
    threading.Thread(target=_watch_stop, args=(control, stop, done), name="streamssl-stop", daemon=True).start()
    try:
        WorkerTrainer(cfg, stop, data_iterator=iterator, ray_session=True).run()
    except _EXPECTED_ERRORS as err:
        ray.get(control.fail.remote(type(err).__name__, str(err)))
        raise
    finally:
        done.set()


def _absolute(cfg: Config) -> Config:
    """The config with absolute run dir and data paths: Ray Train workers run in a directory of their own."""
    source = cfg.data.source
    if is_ray_spec(source):
        kind, path = parse_ray_spec(source)  # also: a missing path fails here, before Ray starts
        source = f"ray+{kind}://{path}"
    elif source and "://" not in source:
        source = os.path.abspath(source)
    return dataclasses.replace(cfg, run_dir=os.path.abspath(cfg.run_dir), data=dataclasses.replace(cfg.data, source=source))


def start_ray(address: str = "", workers: int = 0) -> str | None:
    """Joins the cluster at `address`, or starts a local Ray; None if Ray was running already (nothing to stop).

    A local Ray gets a CPU slot per worker on top of the machine's cores, so that Ray Data's read and
    decode tasks are not starved by the workers' reservations, a short temp dir of its own (its socket
    paths have a length limit) and no dashboard; `RAY_AUTH_MODE=disabled` keeps it from writing a token
    into the home directory. Returns the local temp dir ("" for a cluster) for `stop_ray`.
    """
    import ray

    if ray.is_initialized():
        return None
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        temp_dir = ""
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
        # Without a dashboard, Ray Train's placement-group cleaner logs a warning every few seconds that it
        # cannot query the state API: Ray's own processes log errors only.
        ray.init(num_cpus=(os.cpu_count() or 1) + workers, include_dashboard=False, _temp_dir=temp_dir,
                 logging_level=logging.WARNING, logging_config=ray.LoggingConfig(log_level="ERROR"))
    quiet_ray_data()
    return temp_dir


# Ray's own threads in a driver, and Ray Data's block prefetchers (parked on a condition until collected).
_RAY_SERVICE_THREADS = frozenset({"PythonGCThread", "ray_listen_error_messages", "ray_print_logs", "Prefetcher"})


def threads_running_ray() -> list[str]:
    """Names of this process's threads with Ray code on their stack, other than Ray's service threads."""
    frames = sys._current_frames()
    ray_dir = f"{os.sep}ray{os.sep}"
    others = [thread for thread in threading.enumerate() if thread is not threading.current_thread()
              and thread.name not in _RAY_SERVICE_THREADS and thread.ident in frames]
    return [thread.name for thread in others
            if any(ray_dir in entry.filename for entry in traceback.extract_stack(frames[thread.ident]))]


def stop_ray(temp_dir: str | None, wait_seconds: float = 10.0) -> None:
    """Shuts down a Ray that `start_ray` started, once no thread of ours is still inside a Ray call.

    A thread that calls into Ray after `ray.shutdown()` makes Ray end the whole process with exit code 1
    (seen when a Ray Data reader was still winding down), so wait for such threads for up to `wait_seconds`.
    """
    import ray

    if temp_dir is None:
        return
    gc.collect()  # abandoned Ray Data iterators stop their threads when collected
    deadline = time.monotonic() + wait_seconds
    busy = threads_running_ray()
    while busy and time.monotonic() < deadline:
        time.sleep(0.05)
        busy = threads_running_ray()
    if busy:
        log.warning("shutting Ray down while threads still run Ray code: %s", ", ".join(busy))
    ray.shutdown()
    if temp_dir:
        shutil.rmtree(temp_dir, ignore_errors=True)


def quiet_ray_data() -> None:
    """No progress bars or per-execution INFO lines from Ray Data between the trainer's own lines."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = True  # what our positions rely on; Train copies it per split
    logging.getLogger("ray.data").setLevel(logging.WARNING)


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
    if workers == 0 and not is_ray_spec(cfg.data.source):
        raise ConfigError("without --workers, only a ray+webdataset:// / ray+parquet:// / ray+images:// spec runs on Ray")
    cfg = _absolute(cfg)
    if is_ray_spec(cfg.data.source) and resolve_mode(cfg.data.source, cfg.data.mode) not in RAY_MODES:
        raise ConfigError(f"data.mode {cfg.data.mode} is not available for Ray Data sources; use {' or '.join(RAY_MODES)}")
    if workers > 1 and not is_ray_spec(cfg.data.source) and not cfg.data.source.startswith("kafka://"):
        rank_shard_spec(source_factory(cfg.data, cfg.train.seed, cfg.kafka).args[0],  # refused before Ray starts
                        resolve_mode(cfg.data.source, cfg.data.mode), workers - 1, workers)
    stop = stop or threading.Event()
    temp_dir = start_ray(ray_address, workers)
    try:
        if workers == 0:
            WorkerTrainer(cfg, stop, data_iterator=ray_dataset(cfg).iterator()).run()
        else:
            fit_on_ray(cfg, workers, stop, cpus_per_worker=cpus_per_worker(workers))
    finally:
        stop_ray(temp_dir)


def cpus_per_worker(workers: int) -> int:
    """CPUs each worker reserves, and so its torch threads (Ray sets OMP_NUM_THREADS from it): the cluster's CPUs
    as they are now, shared among the workers after one per worker is left to Ray Data's read/decode tasks.
    On the local Ray `start_ray` makes (cores + workers CPUs) that is the machine's cores // workers."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 0) - workers) // workers)


def fit_on_ray(cfg: Config, workers: int, stop: threading.Event, train_loop: Callable[[dict[str, Any]], None] | None = None,
               loop_config: dict[str, Any] | None = None, cpus_per_worker: int = 1) -> None:
    """One Ray Train run of `train_loop` (default: a WorkerTrainer per worker) on `workers` workers; Ray must be up.

    `train_loop` gets {"config": the config as a dict, "control": the run's control actor, **loop_config}
    (benchmarks pass their own loop).
    """
    import ray
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # else every progress line reaches the driver twice
    device = cfg.train.device
    use_gpu = device.startswith("cuda") or (device == "auto" and ray.cluster_resources().get("GPU", 0) >= workers)
    control = ray.remote(num_cpus=0)(_RunControl).remote()
    ingest = ExecutionOptions(preserve_order=True)  # deterministic split and order: resuming by row count needs it
    trainer = TorchTrainer(
        train_loop or _train_worker, train_loop_config={"config": to_dict(cfg), "control": control, **(loop_config or {})},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        run_config=RunConfig(name=RUN_NAME, storage_path=str(Path(cfg.run_dir) / "ray"),
                             failure_config=FailureConfig(max_failures=MAX_FAILURES),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep)),
        datasets={"train": ray_dataset(cfg)} if is_ray_spec(cfg.data.source) else None,
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
