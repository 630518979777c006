"""A run on a lake directory follows it: it trains on shards that land while it runs, and stops cleanly
while waiting for more."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from streamssl.pipeline.images import Trainer
from streamssl.streams.fashion_mnist import load_fashion_mnist
from streamssl.streams.lake import build_lake
from tests.conftest import tiny_config


def _wait_for(condition, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_training_follows_a_growing_lake(tmp_path: Path) -> None:
    images, labels = load_fashion_mnist("train")
    lake = tmp_path / "lake"
    build_lake(lake, images[:128], labels[:128], shard_size=64)  # shard-000000, shard-000001: 4 batches
    trainer = Trainer(tiny_config(tmp_path / "run", lake, "data.mode=auto", "data.shuffle_buffer=0",
                                  "data.poll_seconds=0.1", "checkpoint.every_steps=0"))
    assert trainer.task.make_source.keywords["mode"] == "follow"  # a directory is followed by default
    thread = threading.Thread(target=trainer.run)
    thread.start()
    try:
        assert _wait_for(lambda: trainer.state.step == 4)
        time.sleep(0.5)
        assert trainer.state.step == 4  # nothing more to read: the run waits instead of ending
        # A producer lands a new shard the safe way (temp name, then rename) with a later name.
        build_lake(tmp_path / "incoming", images[128:192], labels[128:192], shard_size=64)
        (tmp_path / "incoming" / "shard-000000.tar").rename(lake / "shard-000002.tar")
        assert _wait_for(lambda: trainer.state.step == 6)
    finally:
        trainer.stop.set()  # stops while the loader is blocked waiting for shards
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert trainer.state.samples_seen == 192
    assert trainer.state.position.shard.endswith("shard-000002.tar")
    assert (tmp_path / "run" / "checkpoints" / "ckpt-000000006.pt").is_file()
    assert not (tmp_path / "run" / "dead-letter.jsonl").exists()
