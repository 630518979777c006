"""One pass over Fashion-MNIST delivered in several stream orders, without replay, with the replay buffer (each
policy) and with replay + distillation: full-set kNN after the pass, a kNN curve, forgetting, steps, wall time,
and the goals next to the measured values.

For each order a lake is written whose name order is that stream order (`streamssl lake --order`), and the
default method (MoCo, its recipe) makes one pass over it (`data.mode=once`: shards in name order through the
default shuffle buffer, each record arriving once), with `train.max_steps` set to the pass's steps so the
schedule anneals over the pass. The reference of a setting is the iid order with the same setting.

* curve: kNN top-1 (3k bank, 2k test subsets) after each tenth of the pass, per class;
* forgetting: per class, the best kNN accuracy it reached on the curve minus its final one, averaged;
* final: kNN on the full 10k test set (bank: `--final-bank` train images, default 10k; k=200, T=0.1) of the
  encoder after the pass.

    .venv/bin/python bench/stream_orders.py [--images 60000] [--orders iid,class-sequential,correlated-runs]
        [--settings none,fifo,reservoir,minred,minred+distill] [--capacity 8192] [--share 0.5] [-- --set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from runs import machine

from streamssl.models import build_backbone
from streamssl.pipeline.config import EvalConfig, load_config
from streamssl.pipeline.evaluation.knn import embed, knn_predict, knn_top1
from streamssl.pipeline.images import Trainer
from streamssl.pipeline.loading.sources import knn_sets
from streamssl.streams.fashion_mnist import load_fashion_mnist
from streamssl.streams.lake import build_lake
from streamssl.streams.orders import stream_order

SETTINGS: dict[str, list[str]] = {
    "none": ["replay.capacity=0"],
    "fifo": ["replay.policy=fifo"],
    "reservoir": ["replay.policy=reservoir"],
    "minred": ["replay.policy=minred"],
    "minred+distill": ["replay.policy=minred", "distill.weight=1.0"],
}


class Curve:
    """Per-class kNN accuracy of the encoder at each evaluation of a run (`reset` between runs)."""

    def __init__(self) -> None:
        self.data = knn_sets(EvalConfig(bank_size=3000, test_size=2000))
        self.points: list[dict[str, Any]] = []
        self.baselines: dict[str, float] = {}

    def reset(self) -> Curve:
        self.points = []
        return self

    def per_class(self, encoder: torch.nn.Module, mean: list[float], std: list[float]) -> tuple[float, list[float]]:
        bank, bank_labels, test, test_labels = self.data
        device = next(encoder.parameters(), torch.empty(0)).device
        keys, queries = (embed(encoder, images, mean, std, device) for images in (bank, test))
        predicted = torch.cat([knn_predict(queries[start:start + 1024], keys, bank_labels, 10)
                               for start in range(0, len(queries), 1024)])
        return (float((predicted == test_labels).float().mean()),
                [float((predicted[test_labels == c] == c).float().mean()) for c in range(10)])

    def __call__(self, trainer: Trainer) -> dict[str, float]:
        task = trainer.task
        mean, std = task.cfg.data.mean, task.cfg.data.std
        if not self.baselines:  # on the same subset and preprocessing, once
            self.baselines = {"knn_raw_pixels": self.per_class(torch.nn.Flatten(), mean, std)[0],
                              "knn_untrained": self.per_class(untrained(task.cfg), mean, std)[0]}
        knn, per_class = self.per_class(task.encoder(), mean, std)
        self.points.append({"step": trainer.state.step, "samples": trainer.state.samples_seen, "knn": knn,
                            "per_class": per_class})
        return {"knn_top1": knn, "knn_step": float(trainer.state.step), **self.baselines}

    def forgetting(self) -> float:
        per_class = np.array([point["per_class"] for point in self.points])
        return float((per_class.max(axis=0) - per_class[-1]).mean())


def untrained(cfg: Any) -> torch.nn.Module:
    """The run's encoder as it is before training (the same seed's initialisation)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return build_backbone(cfg.model.backbone, cfg.data.channels)[0]


def one_pass(lake: Path, arriving: int, setting: str, run_dir: Path, extra: list[str], capacity: int,
             share: float, full: tuple[torch.Tensor, ...], curve: Curve) -> dict[str, Any]:
    sets = [f"data.source={lake}", "data.mode=once", f"run_dir={run_dir}", "train.max_minutes=0", "metrics.port=0",
            "checkpoint.every_seconds=0", "checkpoint.every_steps=1000000", "eval.every_seconds=0",
            "train.log_every_seconds=60", f"replay.capacity={capacity}", f"replay.share={share}",
            *SETTINGS[setting], *extra]
    cfg = load_config(sets=sets)
    batch = cfg.train.batch_size - (round(cfg.train.batch_size * share) if cfg.replay.capacity else 0)
    steps = arriving // batch
    cfg = load_config(sets=[*sets, f"train.max_steps={steps}", f"eval.every_steps={max(1, steps // 10)}"])
    trainer = Trainer(cfg)
    curve.reset()
    trainer.task.evaluate = lambda: curve(trainer)  # type: ignore[method-assign]
    started = time.monotonic()
    state = trainer.run()
    seconds = time.monotonic() - started
    final = knn_top1(trainer.task.encoder(), *full, cfg.data.mean, cfg.data.std, trainer.task.device)
    return {"setting": setting, "final_knn": round(final, 4), "forgetting": round(curve.forgetting(), 4),
            "curve": [round(point["knn"], 4) for point in curve.points], "steps": state.step,
            "arriving_samples": state.samples_seen, "training_samples": state.step * cfg.train.batch_size,
            "seconds": round(seconds, 1), "arriving_per_second": round(state.samples_seen / seconds, 1),
            "training_per_second": round(state.step * cfg.train.batch_size / seconds, 1),
            "buffer_redundancy": None if trainer.task.replay is None else round(trainer.task.replay.redundancy(), 4)}


def goals(rows: dict[tuple[str, str], dict[str, Any]], replayed: str) -> list[dict[str, Any]]:
    """The issue's goals, each with its measured value, for the setting `replayed` (the replay default)."""
    out = []
    plain_iid = rows.get(("iid", "none"))
    iid = rows.get(("iid", replayed))
    for order in ("class-sequential", "correlated-runs"):
        row = rows.get((order, replayed))
        if row and iid and plain_iid:
            ratio = row["final_knn"] / iid["final_knn"]
            out.append({"goal": f"{order} {replayed}: >= 0.95 of iid with the same setting, >= plain iid",
                        "ratio": round(ratio, 4), "plain_iid": plain_iid["final_knn"], "value": row["final_knn"],
                        "met": ratio >= 0.95 and row["final_knn"] >= plain_iid["final_knn"]})
    sequential, plain_sequential = rows.get(("class-sequential", replayed)), rows.get(("class-sequential", "none"))
    if sequential and plain_sequential:
        out.append({"goal": "class-sequential forgetting <= half of no replay", "value": sequential["forgetting"],
                    "no_replay": plain_sequential["forgetting"],
                    "met": sequential["forgetting"] <= plain_sequential["forgetting"] / 2})
    if iid and plain_iid:
        cost = plain_iid["final_knn"] - iid["final_knn"]
        out.append({"goal": "iid: replay costs <= 1 kNN point", "cost_points": round(100 * cost, 2), "met": cost <= 0.01})
        out.append({"goal": "arriving samples/s with replay >= 0.9 of without",
                    "ratio": round(iid["arriving_per_second"] / plain_iid["arriving_per_second"], 3),
                    "training_samples_ratio": round(iid["training_per_second"] / plain_iid["training_per_second"], 3),
                    "met": iid["arriving_per_second"] >= 0.9 * plain_iid["arriving_per_second"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60000, help="the first N training images make the pass")
    parser.add_argument("--orders", default="iid,class-sequential,correlated-runs")
    parser.add_argument("--settings", default="none,fifo,reservoir,minred,minred+distill")
    parser.add_argument("--capacity", type=int, default=8192, help="replay.capacity of the replay settings")
    parser.add_argument("--share", type=float, default=0.5, help="replay.share of the replay settings")
    parser.add_argument("--run-length", type=int, default=200, help="correlated-runs: images per run")
    parser.add_argument("--final-bank", type=int, default=10000, help="kNN bank of the final score (0 = all 60k)")
    parser.add_argument("run_args", nargs="*", help="--set key=value pairs for every run (after --)")
    args = parser.parse_args()
    extra = [value for flag, value in zip(args.run_args[::2], args.run_args[1::2], strict=True) if flag == "--set"]
    print(json.dumps({**machine(), "images": args.images, "capacity": args.capacity, "share": args.share,
                      "final_bank": args.final_bank or 60000}), flush=True)
    images, labels = load_fashion_mnist("train")
    images, labels = images[:args.images], labels[:args.images]
    full, curve = knn_sets(EvalConfig(bank_size=args.final_bank, test_size=0)), Curve()
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="streamssl-orders-") as scratch:
        for order in args.orders.split(","):
            lake = Path(scratch) / f"lake-{order}"
            build_lake(lake, images, labels, order=stream_order(labels, order, args.run_length, seed=0))
            for setting in args.settings.split(","):
                row = {**one_pass(lake, len(images), setting, Path(scratch) / f"run-{order}-{setting}", extra,
                               args.capacity, args.share, full, curve), "subset_baselines": curve.baselines}
                rows[(order, setting)] = row
                print(json.dumps({"order": order, **row}), flush=True)
    replayed = next((s for s in ("minred", "minred+distill", "reservoir", "fifo") if s in args.settings.split(",")), "")
    for goal in goals(rows, replayed) if replayed else []:
        print(json.dumps(goal), flush=True)


if __name__ == "__main__":
    main()
