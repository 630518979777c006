"""Arriving and training samples/s of one iid pass with and without the replay buffer, no evals: what the buffer
itself costs (run it on a quiet machine; the ratios are within this one run).

    .venv/bin/python bench/replay_throughput.py [--images 6000] [--capacity 4096] [--share 0.5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from runs import machine

from streamssl.pipeline.config import load_config
from streamssl.pipeline.images import Trainer
from streamssl.streams.fashion_mnist import load_fashion_mnist
from streamssl.streams.lake import build_lake
from streamssl.streams.orders import stream_order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--capacity", type=int, default=4096)
    parser.add_argument("--share", type=float, default=0.5)
    args = parser.parse_args()
    print(json.dumps(machine()), flush=True)
    images, labels = load_fashion_mnist("train")
    images, labels = images[:args.images], labels[:args.images]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="streamssl-replay-") as scratch:
        lake = Path(scratch) / "lake"
        build_lake(lake, images, labels, order=stream_order(labels, "iid", seed=0))
        for policy in ("none", "fifo", "minred"):
            replay = ["replay.capacity=0"] if policy == "none" else [
                f"replay.capacity={args.capacity}", f"replay.policy={policy}", f"replay.share={args.share}"]
            cfg = load_config(sets=[f"data.source={lake}", "data.mode=once", f"run_dir={scratch}/run-{policy}",
                                    "train.max_minutes=0", "metrics.port=0", "eval.dataset=none", "eval.every_seconds=0",
                                    "checkpoint.every_seconds=0", "checkpoint.every_steps=1000000",
                                    "train.log_every_seconds=600", *replay])
            trainer = Trainer(cfg)
            state = trainer.run()
            seconds = trainer.loop_seconds - trainer.startup_seconds
            rows[policy] = {"policy": policy, "steps": state.step, "arriving_per_second": state.samples_seen / seconds,
                            "training_per_second": state.step * cfg.train.batch_size / seconds}
            print(json.dumps(rows[policy]), flush=True)
    for policy in ("fifo", "minred"):
        ratio = rows[policy]["arriving_per_second"] / rows["none"]["arriving_per_second"]
        print(json.dumps({"goal": f"{policy}: arriving samples/s >= 0.9 of without", "ratio": round(ratio, 3),
                          "training_samples_ratio": round(rows[policy]["training_per_second"]
                                                          / rows["none"]["training_per_second"], 3),
                          "met": ratio >= 0.9}), flush=True)


if __name__ == "__main__":
    main()
