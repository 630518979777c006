"""Decode fuzz: seeded mutated small images through the real loader process, with our decoder (Pillow) and with
torchvision's libpng binding (the one that segfaulted), side by side in one run.

Every crash of the loader process is survived (a restart, the record dead-lettered as decoder_crash); the
numbers say how often each decoder crashes it, and that no record is lost: trained + rejected + the last
incomplete batch of each shard = generated.

    python bench/decode_fuzz.py --seconds 60
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import itertools
import logging
import platform
import queue
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_png

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.fuzzing: the mutations the CI test uses

from streamssl.pipeline.loading import loader_worker
from streamssl.pipeline.loading.decode import decode_record
from streamssl.pipeline.loading.loader import BatchLoader
from streamssl.pipeline.loading.messages import Batch, End, Failure, Reject
from streamssl.streams.lake import write_shard
from streamssl.streams.records import Record
from streamssl.streams.webdataset_source import WebDatasetSource
from tests.fuzzing import mutated_images

SHARD = 500
BATCH = 16


def _libpng(record: Record, image_field: str, channels: int, size: int, max_bytes: int = 0,
            full_side: int = 0) -> np.ndarray:
    """The decoder before: torchvision's libpng binding for anything PNG, Pillow for the rest."""
    faulthandler.disable()
    data = record.fields.get("png", b"")
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        try:
            image = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.GRAY)
        except RuntimeError as err:
            raise ValueError(f"corrupt_image: {str(err).splitlines()[0]}") from None
        if tuple(image.shape[1:]) == (size, size):
            return image.numpy()
    return decode_record(record, image_field, channels, size, max_bytes, full_side)


def run(decoder: str, seconds: float, seed: int) -> dict[str, float]:
    loader_worker.decode_record = _libpng if decoder == "libpng" else decode_record  # the loader process is forked
    images = mutated_images(seed)
    totals = {"images": 0, "crashes": 0, "trained": 0, "rejected": 0, "unbatched": 0, "lost": 0, "twice": 0}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "shard-000000.tar"
        while time.monotonic() - started < seconds:
            batch = itertools.islice(images, SHARD)
            records = [(f"f{totals['images'] + i:07d}", {"png": data}) for i, data in enumerate(batch)]
            write_shard(shard, records)
            loader = BatchLoader(partial(WebDatasetSource, tmp, mode="once"), None, BATCH, "png", 1, 28)
            handled: list[str] = []
            try:
                while True:
                    with contextlib.suppress(queue.Empty):
                        message = loader.next(timeout=5)
                        if isinstance(message, End | Failure):
                            assert isinstance(message, End), message
                            break
                        if isinstance(message, Batch):
                            totals["trained"] += len(message.keys)
                            handled += message.keys
                        elif isinstance(message, Reject):
                            totals["rejected"] += 1
                            handled.append(message.key)
            finally:
                loader.close()
            totals["crashes"] += loader.restarts
            totals["images"] += len(records)
            unhandled = len(records) - len(set(handled))
            totals["twice"] += len(handled) - len(set(handled))
            # once mode drops only the shard's last incomplete batch: more than that unhandled is lost
            totals["unbatched" if unhandled < BATCH else "lost"] += unhandled
    totals["seconds"] = time.monotonic() - started
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="per decoder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in cpu.splitlines() if line.startswith("Flags")), [])
    print(f"machine: {platform.node()} | {model} | " + " ".join(f for f in flags if f.startswith(("avx512", "avx2", "amx"))))
    print(f"torch {torch.__version__}; seed {args.seed}; {args.seconds:.0f} s per decoder; shards of {SHARD}, "
          f"batches of {BATCH}")
    print("| decoder | images | loader crashes (restarts) | trained | rejected | last partial batches | lost | twice "
          "| images/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for decoder in ("libpng", "ours"):
        t = run(decoder, args.seconds, args.seed)
        print(f"| {decoder} | {t['images']:.0f} | {t['crashes']:.0f} | {t['trained']:.0f} | {t['rejected']:.0f} | "
              f"{t['unbatched']:.0f} | {t['lost']:.0f} | {t['twice']:.0f} | {t['images'] / t['seconds']:.0f} |")
    print("goals: ours 0 crashes; lost 0 and twice 0 for both (a crash costs a restart, never a record)")


if __name__ == "__main__":
    main()
