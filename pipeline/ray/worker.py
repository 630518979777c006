"""The trainer of one worker of a multi-worker run (pipeline/ray/driver.py starts the group), or of a Ray Data run.

Every worker runs the ordinary trainer: DDP averages the gradients (gloo on CPU, NCCL on GPU), and the methods
gather what they store (queues, banks, buffers) from all workers (models/distributed.py). Each worker
reads its own share of the stream: a `streaming_split` shard of a Ray dataset, the Kafka partitions p
with p % N == rank (self-assigned, offsets committed for the one group), or every N-th shard of a
webdataset lake (a local directory or pattern, or an s3 prefix).

Workers must take the same decisions at the same step, or a collective waits forever. So the per-rank
choices of the loop are agreed on: whether to stop (a stop request, the time budget, the end of one
worker's stream), whether a checkpoint is due by time, and whether the loss is finite (its mean over
workers). Rank 0 alone evaluates, publishes and writes checkpoints; the checkpoint holds every worker's
stream position and RNG state, gathered to rank 0, and each worker resumes from its own. After writing,
the checkpoint is also reported to Ray Train (`ray.train.report`), so that a restart by `FailureConfig`,
possibly on other nodes, resumes from it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from streamssl.pipeline.checkpointing import Checkpointer
from streamssl.pipeline.collective import collective_for
from streamssl.pipeline.config import Config, ConfigError
from streamssl.pipeline.device import resolve_device
from streamssl.pipeline.images import Trainer
from streamssl.pipeline.loading.positions import merge_positions, position_from_dict, position_to_dict
from streamssl.pipeline.loading.sources import resolve_mode, source_factory, source_spec
from streamssl.pipeline.ray.feed import RayDataFeed
from streamssl.pipeline.run_state import RunState
from streamssl.streams.files import RunPaths
from streamssl.streams.webdataset_source import WebDatasetSource

log = logging.getLogger(__name__)


# --- webdataset lakes (a directory, a pattern, an s3 prefix): every N-th shard per worker ------------------
def rank_shard_spec(spec: str, mode: str, worker: int, workers: int, s3_endpoint: str = "") -> str:
    """A webdataset spec naming this worker's shards: every `workers`-th one of the lake, from `worker`.

    The lake's shards are the ones a single pass over `spec` reads, in name order: a directory's or an s3 prefix's
    listing (`*.tar` objects directly under it), or a pattern's expansion. Every worker lists the lake itself when
    it starts, so the shares are disjoint as long as the lake does not change during the start-up of the group.
    Follow mode reads a lake that keeps growing in name order; shards that land later cannot be dealt
    out in advance, so it is refused (Kafka or a `ray+webdataset://` spec split the stream instead).
    """
    if mode == "follow":
        raise ConfigError("data.mode follow (the default for a lake directory or an s3 prefix) cannot be split across "
                          "workers; use --set data.mode=cycle or once, a ray+webdataset:// spec, or a Kafka topic")
    lister = WebDatasetSource(spec, mode="once", s3_endpoint=s3_endpoint)  # lists a directory or prefix now
    shards = list(lister.position().order)
    lister.close()
    mine = shards[worker::workers]
    if not mine:
        raise ConfigError(f"{spec} has {len(shards)} shard(s), fewer than the {workers} workers")
    if any(char in path for path in mine for char in "{},"):
        raise ConfigError(f"shard paths with braces or commas cannot be split across workers: {mine[0]}")
    return mine[0] if len(mine) == 1 else "{" + ",".join(mine) + "}"


# --- checkpoints: rank 0 writes, every rank reads its own part ------------------------------------------
class SharedCheckpointer(Checkpointer):
    """The run dir's checkpoints for a group of workers (our own format; see pipeline/checkpointing.py).

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
        position = merge_positions([position_from_dict(entry["position"]) for entry in ranks], self.worker)
        return {**ckpt, "source": position_to_dict(position), "rng": ranks[self.worker]["rng"]}


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
    """The image loop of one worker in a group (torch.distributed initialised), or of a single Ray Data run.

    Only the construction differs from a single-process `Trainer`: the collective the loop agrees through,
    the shared checkpointer, this worker's share of the stream, its augmentation seed and a DDP wrapper.

    Args:
        cfg: The run's config; `train.batch_size` is per worker, so the global batch is workers x batch_size
            and the learning rate scales with it (linear scaling rule).
        stop: Set to stop after the current step (all workers stop at the same step).
        data_iterator: The Ray Data iterator this worker reads, for a `ray+…` spec.
        ray_session: Inside Ray Train: report checkpoints to it and resume from its latest.
    """

    def __init__(self, cfg: Config, stop: threading.Event | None = None, *, data_iterator: Any = None,
                 ray_session: bool = False) -> None:
        collective = collective_for(resolve_device(cfg.train.device))
        self.workers, self.worker = collective.world_size, collective.rank
        checkpointer = SharedCheckpointer(RunPaths(Path(cfg.run_dir)).checkpoints, cfg.checkpoint.keep, self.worker,
                                          self.workers, ray_session)
        super().__init__(cfg, stop, collective=collective, checkpointer=checkpointer)
        if ray_session:  # a group restarted after a failure may start before the killed rank 0 has exited
            self.lock_wait_seconds = 30.0
        task = self.task
        task.generator.manual_seed(_rank_seed(cfg.train.seed, self.worker))
        source = source_spec(cfg.data)
        if source.kind == "ray":
            if data_iterator is None:
                raise ConfigError(f"{source.text} is read by Ray Data: start it with run_distributed")
            task.open_feed = lambda position: RayDataFeed(data_iterator, position, cfg, report_unlisted=self.worker == 0)
        elif self.workers > 1 and source.kind == "kafka":
            # Every worker reads its own fixed share of the partitions and commits offsets for the one group.
            task.make_source = functools.partial(task.make_source, split=(self.worker, self.workers))
        elif self.workers > 1:
            spec = rank_shard_spec(task.make_source.args[0], resolve_mode(source, cfg.data.mode), self.worker,
                                   self.workers, cfg.data.s3_endpoint)
            task.make_source = source_factory(dataclasses.replace(cfg.data, source=spec), cfg.train.seed, cfg.kafka)
        if self.workers > 1:
            # Buffers are not broadcast: the gathered queues and banks are equal on every worker by construction,
            # and broadcasting NPID's bank every step would cost 64 MiB. Unused parameters: only SwAV has
            # them (its prototypes are detached while frozen); looking for them costs a graph walk per step.
            ddp = torch.nn.parallel.DistributedDataParallel
            no_buffer_sync: dict[str, Any] = (
                {"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                else {"broadcast_buffers": False})  # the older name (torch < 2.14)
            task.forward_module = ddp(task.method, device_ids=[torch.cuda.current_device()] if task.device.type == "cuda"
                                      else None, find_unused_parameters=cfg.method == "swav", **no_buffer_sync)

    def run(self) -> RunState:
        """The loop, then this worker's summary (what it trained on and a digest of its weights) in workers/."""
        state = super().run()
        summary = {"rank": self.worker, "world_size": self.workers, "step": state.step,
                   "samples_seen": state.samples_seen, "position": _plain(position_to_dict(state.position)),
                   "parameters_sha256": parameters_sha256(self.task.method)}
        self.paths.workers.mkdir(exist_ok=True)
        (self.paths.workers / f"rank-{self.worker}.json").write_text(json.dumps(summary) + "\n")
        return state


def _plain(position: dict[str, Any]) -> dict[str, Any]:
    """The JSON-friendly part of a position for the worker summary (no shuffle-buffer records)."""
    return {key: value for key, value in position.items() if isinstance(value, str | int | float | dict)}

