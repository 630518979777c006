"""Training throughput on full-resolution RGB JPEGs at 224 px: torchvision:resnet18, batch 32, on this CPU.

A generated folder of photos-like JPEGs (320-1280 px, five aspect ratios) is written as a lake with
`streamssl lake --from`, then the real loop trains on it (`Trainer.run`: shards → background decode at full
resolution → per-image random-resized crops to 224 → resnet18 step). samples/s counts the steps after the
first (which pays for start-up), end to end: decoding, augmentation, forward, backward, optimizer. Prints the
number, the resolved precision and the CPU model and relevant flags from lscpu, as one JSON line.

    .venv/bin/python bench/rgb_224.py [--steps 4] [--images 96] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it, before torch loads OpenMP

import numpy as np
import torch
from PIL import Image

from streamssl.pipeline.cli import main as cli
from streamssl.pipeline.config import load_config
from streamssl.pipeline.device import resolve_precision
from streamssl.pipeline.images import Trainer
from streamssl.pipeline.loading.messages import Batch

SIZES = [(1280, 960), (640, 640), (480, 720), (1024, 576), (320, 480)]
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def write_photos(root: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    for index in range(count):
        width, height = SIZES[index % len(SIZES)]
        x, y = np.meshgrid(np.linspace(0, 1, width, dtype=np.float32), np.linspace(0, 1, height, dtype=np.float32))
        waves = [np.sin(x * rng.uniform(2, 20) + y * rng.uniform(2, 20)) for _ in range(3)]
        pixels = ((np.stack(waves, -1) * 0.5 + 0.5) * 255).astype(np.uint8)
        folder = root / f"class{index % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{index:04d}.jpg", quality=90)


def cpu() -> dict[str, object]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"model": "unknown (no lscpu)"}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    return {"model": fields.get("Model name", "").strip(), "cpus": fields.get("CPU(s)", "").strip(),
            "flags": [flag for flag in FLAGS if flag in flags]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="steps in all (at least 2); the first is not counted")
    parser.add_argument("--images", type=int, default=96, help="photos in the generated lake")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="streamssl-rgb224-"))
    write_photos(work / "photos", args.images)
    cli(["lake", "--from", str(work / "photos"), "--out", str(work / "lake"), "--shard-size", "32"])
    cfg = load_config(sets=[
        f"run_dir={work / 'run'}", f"data.source={work / 'lake'}", "data.mode=cycle", "data.channels=3",
        "data.size=224", "data.image_field=jpg", "data.mean=[0.485,0.456,0.406]", "data.std=[0.229,0.224,0.225]",
        "model.backbone=torchvision:resnet18", "train.batch_size=32", f"train.max_steps={args.steps}",
        "train.max_minutes=0", "eval.dataset=none", "metrics.port=0", "checkpoint.every_seconds=0",
        "checkpoint.every_steps=0", "data.shuffle_buffer=32", *args.set])
    trainer = Trainer(cfg)
    ends: list[float] = []
    step = trainer.task.step

    def timed_step(batch: Batch):  # type: ignore[no-untyped-def]
        result = step(batch)
        ends.append(time.perf_counter())
        return result

    trainer.task.step = timed_step  # type: ignore[method-assign]
    trainer.run()
    samples = cfg.train.batch_size * (len(ends) - 1)
    print(json.dumps({"samples_per_s": round(samples / (ends[-1] - ends[0]), 2), "steps_timed": len(ends) - 1,
                      "size": 224, "backbone": cfg.model.backbone, "batch_size": cfg.train.batch_size,
                      "method": cfg.method, "precision": resolve_precision(cfg.train.precision, trainer.task.device),
                      "seconds_per_step": round((ends[-1] - ends[0]) / (len(ends) - 1), 1),
                      "torch_threads": torch.get_num_threads(), "load_average_1min": round(os.getloadavg()[0], 1),
                      "cpu": cpu()}))


if __name__ == "__main__":
    main()
