"""Shared fixtures: a small real lake of Fashion-MNIST shards, and a tiny, fast training config."""

from __future__ import annotations

import contextlib
import queue
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from streamssl.pipeline.config import Config, load_config
from streamssl.pipeline.loading.messages import End, Failure, Message
from streamssl.streams.fashion_mnist import load_fashion_mnist
from streamssl.streams.lake import build_lake

pytest_plugins = ("tests.kafka_broker", "tests.s3_store")  # Tansu broker fixtures; `s3`: a bucket on moto

LAKE_IMAGES = 640  # 5 shards of 128: enough for several batches of 32 and a pass boundary


@pytest.fixture(scope="session")
def small_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    images, labels = load_fashion_mnist("train")
    lake = tmp_path_factory.mktemp("lake")
    build_lake(lake, images[:LAKE_IMAGES], labels[:LAKE_IMAGES], shard_size=128)
    return lake


def tiny_config(run_dir: Path, data: Path, *sets: str) -> Config:
    """A config that trains in well under a second per step on 2 CPU cores."""
    return load_config(sets=tiny_sets(run_dir, data, *sets))


def tiny_sets(run_dir: Path, data: Path, *sets: str) -> list[str]:
    """The KEY=VALUE settings of `tiny_config` (for `streamssl run --set`)."""
    base = [
        f"run_dir={run_dir}", f"data.source={data}", "data.mode=cycle", "data.shuffle_buffer=64",
        "train.batch_size=32", "model.bn_splits=4", "train.max_minutes=0",
        "train.deterministic=true", "checkpoint.every_steps=2", "checkpoint.every_seconds=0",
        "eval.dataset=none", "eval.every_steps=0", "metrics.port=0", "train.log_every_seconds=1000",
        "optim.warmup_steps=2",
        # the regression gate off (the collapse gate stays): a tiny kNN monitor moves by chance past 0.02
        "publish.tolerance=1",
    ]
    method = next((item.partition("=")[2] for item in reversed(sets) if item.startswith("method=")), "moco")
    if method == "moco":  # the section of another method is refused as a setting the run would ignore
        base.append("moco.queue_size=128")
    return [*base, *sets]


def read_to_end(feed: Any, timeout: float) -> list[Message]:
    """Every message a feed of a finite stream hands out, up to its `End`; the feed is closed after."""
    messages: list[Message] = []
    try:
        while not messages or not isinstance(messages[-1], End):
            messages.append(feed.next(timeout=timeout))
    finally:
        feed.close()
    return messages


def drain(feed: Any, timeout: float) -> list[Message]:
    """Every message up to `End` or `Failure`, polling through quiet spells (a restarted loader process is one);
    fails if that takes longer than `timeout` seconds. The feed is closed after."""
    messages: list[Message] = []
    deadline = time.monotonic() + timeout
    try:
        while not messages or not isinstance(messages[-1], End | Failure):
            assert time.monotonic() < deadline, "the feed hung"
            with contextlib.suppress(queue.Empty):
                messages.append(feed.next(timeout=1))
    finally:
        feed.close()
    return messages


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models step many times faster on one torch thread than on two that share busy cores with other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
