"""Arriving and training samples/s of one iid pass with and without the replay buffer, no evals: what the buffer
itself costs. The settings alternate in rounds (none, fifo, minred, none, ...), so each ratio compares runs made
minutes apart, under the same load, even on a shared machine.

    cd bench && ../.venv/bin/python replay_throughput.py [--images 6000] [--capacity 4096] [--share 0.5]
        [--rounds 3] [--settings none,fifo,minred] [--threads N]

With `replay.share` s, each step trains on (1 - s) arriving and s replayed records, so 1 / (1 - s) training samples
per arriving one (2 at 0.5): the arriving rate is that much lower by construction. The goal (>= 0.9 of without) is
read on training samples/s, which is what the buffer's own cost lowers. `--share 0` is K = 1: each arriving record
trains once and the buffer is filled, evicted and kept current (features, MinRed's neighbours) as in every other
setting, but nothing is drawn from it, so the arriving and training rates are the same and the goal is read as
stated, on arriving samples/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from runs import machine

from streamssl.pipeline.config import load_config
from streamssl.pipeline.images import Trainer
from streamssl.streams.fashion_mnist import load_fashion_mnist
from streamssl.streams.lake import build_lake
from streamssl.streams.orders import stream_order

GOAL = 0.9


def one_pass(lake: Path, run_dir: Path, setting: str, capacity: int, share: float) -> dict[str, float]:
    replay = ["replay.capacity=0"] if setting == "none" else [
        f"replay.capacity={capacity}", f"replay.policy={setting}", f"replay.share={share}"]
    cfg = load_config(sets=[f"data.source={lake}", "data.mode=once", f"run_dir={run_dir}", "train.max_minutes=0",
                            "metrics.port=0", "eval.dataset=none", "eval.every_seconds=0",
                            "checkpoint.every_seconds=0", "checkpoint.every_steps=1000000",
                            "train.log_every_seconds=600", *replay])
    trainer = Trainer(cfg)
    state = trainer.run()
    seconds = trainer.loop_seconds - trainer.startup_seconds
    buffer = trainer.task.replay
    return {"steps": state.step, "arriving_per_second": state.samples_seen / seconds,
            "training_per_second": state.step * cfg.train.batch_size / seconds,
            "buffer_update_share": buffer.update_seconds / seconds if buffer is not None else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--capacity", type=int, default=4096)
    parser.add_argument("--share", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settings", default="none,fifo,minred", help="none first: the others' ratios are to it")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (1 on busy cores: two threads there mostly wait for each other)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = args.settings.split(",")
    print(json.dumps(machine()), flush=True)
    images, labels = load_fashion_mnist("train")
    images, labels = images[:args.images], labels[:args.images]
    runs: dict[str, list[dict[str, float]]] = {setting: [] for setting in settings}
    with tempfile.TemporaryDirectory(prefix="streamssl-replay-") as scratch:
        lake = Path(scratch) / "lake"
        build_lake(lake, images, labels, order=stream_order(labels, "iid", seed=0))
        one_pass(lake, Path(scratch) / "warm-up", settings[0], args.capacity, args.share)  # not counted: the first
        # pass of a process also pays for torch's lazy set-up, which would count against whatever comes first
        for round_index in range(args.rounds):
            for setting in settings:
                row = one_pass(lake, Path(scratch) / f"run-{setting}-{round_index}", setting, args.capacity,
                               args.share)
                runs[setting].append(row)
                print(json.dumps({"round": round_index, "setting": setting,
                                  **{k: round(v, 3) for k, v in row.items()}}), flush=True)
    for setting in settings:
        # each round's ratio is to the no-replay pass of the same round; the median over rounds is the reading
        ratios = [row["training_per_second"] / base["training_per_second"]
                  for row, base in zip(runs[setting], runs[settings[0]], strict=True)]
        summary = {"setting": setting,
                   "arriving_per_second": round(statistics.median(r["arriving_per_second"] for r in runs[setting]), 1),
                   "training_per_second": round(statistics.median(r["training_per_second"] for r in runs[setting]), 1),
                   "training_ratio_to_" + settings[0]: round(statistics.median(ratios), 3),
                   "buffer_update_share": round(statistics.median(r["buffer_update_share"] for r in runs[setting]), 3),
                   "ratio_per_round": [round(ratio, 3) for ratio in ratios]}
        if setting != settings[0]:
            summary.update(goal=f"training samples/s >= {GOAL} x {settings[0]}", met=statistics.median(ratios) >= GOAL)
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
