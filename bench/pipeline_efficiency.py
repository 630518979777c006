"""Stream-fed training vs the same training on in-memory tensors, side by side in one process.

Both sides use one Trainer (same model, batch, augmentation, precision): the stream side runs the
real loop (`Trainer.run`: shards on disk → background decode → train), the memory side calls
the image task's `step` on batches decoded up front. Rounds alternate so that machine noise hits both.
Prints samples/s of each and their ratio (goal ≥ 0.95 on 2 CPU cores).

    .venv/bin/python bench/pipeline_efficiency.py [--steps 100] [--rounds 3] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it, before torch loads OpenMP

import torch

from streamssl.pipeline.config import load_config
from streamssl.pipeline.images import Trainer
from streamssl.pipeline.loading.messages import Batch
from streamssl.streams.fashion_mnist import load_fashion_mnist
from streamssl.streams.lake import default_lake


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="steps per side per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    lake = default_lake()
    images, _ = load_fashion_mnist("train")
    run_dir = Path(tempfile.mkdtemp(prefix="streamssl-bench-"))
    sets = [f"run_dir={run_dir}", f"data.source={lake}", "data.mode=cycle", "eval.dataset=none",
            "metrics.port=0", "train.max_minutes=0", "checkpoint.every_steps=0", "checkpoint.every_seconds=0",
            "train.log_every_seconds=1000", *args.set]
    stream_samples = stream_seconds = memory_samples = memory_seconds = 0.0
    trainer = None
    for round_index in range(args.rounds):
        cfg = load_config(sets=[*sets, f"train.max_steps={(round_index + 1) * args.steps}"])
        batch_size = cfg.train.batch_size
        trainer = Trainer(cfg)
        trainer.run()  # resumes the previous round's checkpoint, then trains `steps` more from the stream
        stream_samples += args.steps * batch_size
        stream_seconds += trainer.loop_seconds

        pixels = torch.from_numpy(images[: args.steps * batch_size]).unsqueeze(1)
        batches = [Batch(pixels[i * batch_size:(i + 1) * batch_size], [], {}, {},
                         torch.arange(i * batch_size, (i + 1) * batch_size)) for i in range(args.steps)]
        started = time.monotonic()
        for batch in batches:
            trainer.task.step(batch)
        memory_seconds += time.monotonic() - started
        memory_samples += args.steps * batch_size
        print(f"round {round_index + 1}: stream {args.steps * batch_size / trainer.loop_seconds:.0f} samples/s, "
              f"memory {args.steps * batch_size / (time.monotonic() - started):.0f} samples/s", flush=True)
    stream_rate, memory_rate = stream_samples / stream_seconds, memory_samples / memory_seconds
    assert trainer is not None
    print(json.dumps({
        "stream_samples_per_s": round(stream_rate, 1), "memory_samples_per_s": round(memory_rate, 1),
        "ratio": round(stream_rate / memory_rate, 3), "batch_size": trainer.cfg.train.batch_size,
        "backbone": trainer.cfg.model.backbone, "precision": trainer.cfg.train.precision,
        "threads": torch.get_num_threads(), "steps_per_side": args.steps * args.rounds,
    }))


if __name__ == "__main__":
    main()
