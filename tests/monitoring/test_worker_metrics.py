"""Every worker of a multi-worker run exports its own metrics, on metrics.port + rank, with a `rank` label.

Two real gloo processes run the worker trainer that Ray Train runs (pipeline/ray/worker.py), without Ray's
start-up; each scrapes its own exporter over HTTP while it trains. The default suite has the in-process check
(tests/monitoring/test_exporter.py, a rank given to one trainer)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from prometheus_client.parser import text_string_to_metric_families

from streamssl.pipeline.ray.worker import WorkerTrainer
from tests.conftest import free_port, tiny_config


def _scrape_until_trained(port: int, seen: dict[str, object], stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        except OSError:
            time.sleep(0.1)
            continue
        samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]
        steps = [sample.value for sample in samples if sample.name == "streamssl_steps_total"]
        if steps and steps[0] >= 1:
            seen.update(port=port, steps=steps[0], ranks=sorted({sample.labels.get("rank", "") for sample in samples}))
            return
        time.sleep(0.1)


def _worker(worker: int, group_port: int, metrics_port: int, lake: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{group_port}", rank=worker, world_size=2)
    try:
        cfg = tiny_config(Path(out) / "run", Path(lake), "train.max_steps=40", f"metrics.port={metrics_port}")
        trainer = WorkerTrainer(cfg)
        seen: dict[str, object] = {}
        stop = threading.Event()
        scraper = threading.Thread(target=_scrape_until_trained, args=(metrics_port + worker, seen, stop), daemon=True)
        scraper.start()
        watcher = threading.Thread(target=lambda: (scraper.join(60), trainer.stop.set()), daemon=True)
        watcher.start()  # stop training once this worker saw its own exporter count a step
        trainer.run()
        stop.set()
        (Path(out) / f"rank-{worker}.json").write_text(json.dumps({**seen, "served_on": trainer.metrics_port}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~100 s on 2 busy cores, most of it two processes importing torch and joining a gloo group
def test_each_worker_serves_its_metrics_on_port_plus_rank(small_lake: Path, tmp_path: Path) -> None:
    metrics_port = free_port()
    while True:  # two free ports in a row
        try:
            with socket.create_server(("127.0.0.1", metrics_port + 1)):
                break
        except OSError:
            metrics_port = free_port()
    mp.spawn(_worker, args=(free_port(), metrics_port, str(small_lake), str(tmp_path)), nprocs=2, join=True)
    for worker in range(2):
        seen = json.loads((tmp_path / f"rank-{worker}.json").read_text())
        assert seen["served_on"] == seen["port"] == metrics_port + worker
        assert seen["steps"] >= 1 and seen["ranks"] == [str(worker)]  # every sample carries this worker's rank
