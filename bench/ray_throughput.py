"""Bench: training samples/s fed by a Ray Data stream vs from tensors in memory, on 1 and 2 Ray Train workers.

Same model, method, batch and config in every run; only the feed changes. "ray" reads the webdataset lake
with Ray Data (read, decode, `streaming_split`, the trainer's feed thread); "memory" hands each worker
slices of a uint8 tensor that is already decoded (its half of Fashion-MNIST). Samples/s is global (all
workers) over the steps after the warm-up, from rank 0's step times; start-up (Ray Train, first Ray Data
batch) is not counted. Prints a table and the ratios stream/memory and 2 workers/1 worker.

    .venv/bin/python bench/ray_throughput.py --steps 200 --warmup 20 --batch-size 256 --workers 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI: idle OpenMP threads must not spin

import torch

from streamssl.pipeline.config import load_config
from streamssl.pipeline.loading.decode import record_id
from streamssl.pipeline.loading.messages import Batch
from streamssl.pipeline.ray.cluster import cpus_per_worker, start_ray, stop_ray
from streamssl.pipeline.ray.driver import fit_on_ray
from streamssl.pipeline.ray.worker import WorkerTrainer
from streamssl.streams.fashion_mnist import load_fashion_mnist
from streamssl.streams.lake import default_lake


class TensorFeed:
    """The loader interface over decoded images in memory: this worker's rows, batch after batch, cycling."""

    def __init__(self, images: torch.Tensor, batch_size: int, worker: int, workers: int) -> None:
        self.images = images[worker::workers].unsqueeze(1).contiguous()
        self.keys = [f"fmnist-train-{index:06d}" for index in range(worker, len(images), workers)]
        self.ids = torch.tensor([record_id(key) for key in self.keys])
        self.batch_size = batch_size
        self.start = 0

    def next(self, timeout: float) -> Batch:
        if self.start + self.batch_size > len(self.images):
            self.start = 0
        rows = slice(self.start, self.start + self.batch_size)
        self.start += self.batch_size
        return Batch(self.images[rows], self.keys[rows], None, {}, self.ids[rows])

    def commit(self, position: Any) -> None:
        pass

    def close(self) -> None:
        pass


class TimedTrainer(WorkerTrainer):
    """A WorkerTrainer that notes when each step ended and, on rank 0, writes the rate after the warm-up."""

    def __init__(self, *args: Any, warmup: int, images: torch.Tensor | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.warmup, self.step_ends = warmup, []
        if images is not None:
            self.task.open_feed = lambda position: TensorFeed(images, self.cfg.train.batch_size, self.worker, self.workers)
        step = self.task.step

        def timed_step(batch: Batch) -> Any:
            result = step(batch)
            self.step_ends.append(time.perf_counter())
            return result

        self.task.step = timed_step

    def run(self) -> Any:
        state = super().run()
        if self.worker == 0:
            measured = self.step_ends[self.warmup:]
            samples = (len(measured) - 1) * self.cfg.train.batch_size * self.workers
            rate = samples / (measured[-1] - measured[0])
            (self.paths.root / "bench.json").write_text(json.dumps({"samples_per_second": rate, "steps": len(measured),
                                                                    "threads": torch.get_num_threads()}))
        return state


def bench_loop(config: dict[str, Any]) -> None:
    """Ray Train's loop for one bench run (pickled by value: this file is not a package)."""
    import ray.train

    cfg = load_config(overrides=config["config"])
    images = torch.from_numpy(load_fashion_mnist("train")[0]) if config["feed"] == "memory" else None
    iterator = ray.train.get_dataset_shard("train") if config["feed"] == "ray" else None
    TimedTrainer(cfg, data_iterator=iterator, ray_session=True, warmup=config["warmup"], images=images).run()


def run(feed: str, workers: int, args: argparse.Namespace, root: Path) -> float:
    run_dir = root / f"{feed}-{workers}"
    source = f"ray+webdataset://{args.data}" if feed == "ray" else ""
    cfg = load_config(sets=[
        f"method={args.method}", f"run_dir={run_dir}", f"data.source={source}", "data.mode=cycle",
        f"data.shuffle_buffer={args.shuffle_buffer}", f"train.batch_size={args.batch_size}",
        f"train.max_steps={args.warmup + args.steps}", "train.max_minutes=0", "checkpoint.every_steps=0",
        "checkpoint.every_seconds=0", "eval.dataset=none", "eval.every_steps=0", "metrics.port=0",
        "train.log_every_seconds=1000", f"train.device={args.device}"])
    started = time.perf_counter()
    fit_on_ray(cfg, workers, threading.Event(), bench_loop, {"feed": feed, "warmup": args.warmup},
               cpus_per_worker=cpus_per_worker(workers))
    result = json.loads((run_dir / "bench.json").read_text())
    rate = result["samples_per_second"]
    print(f"{feed:>6} feed, {workers} worker(s) x {result['threads']} thread(s): {rate:7.0f} samples/s "
          f"({time.perf_counter() - started:.0f} s in all)", flush=True)
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="measured steps per run (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256, help="per worker")
    parser.add_argument("--method", default="moco")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--data", default="", help="webdataset lake for the Ray feed (default: the embedded one)")
    parser.add_argument("--shuffle-buffer", type=int, default=0, help="Ray Data local shuffle rows (0: none)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ray-address", default="")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2")
    args.data = args.data or str(default_lake())
    temp_dir = start_ray(args.ray_address, max(args.workers))
    rates: dict[tuple[str, int], float] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="ray-bench-") as root:
            for workers in args.workers:
                for feed in ("memory", "ray"):
                    rates[feed, workers] = run(feed, workers, args, Path(root))
    finally:
        stop_ray(temp_dir)
    print(f"\n{args.method}, batch {args.batch_size} per worker, {args.steps} steps after {args.warmup}, "
          f"{os.cpu_count()} cores")
    for workers in args.workers:
        print(f"{workers} worker(s): stream/memory = {rates['ray', workers] / rates['memory', workers]:.2f}")
    if 1 in args.workers:
        for workers in (w for w in args.workers if w != 1):
            print(f"{workers} workers / 1: memory {rates['memory', workers] / rates['memory', 1]:.2f}, "
                  f"stream {rates['ray', workers] / rates['ray', 1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
