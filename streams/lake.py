"""Writing WebDataset lakes: atomic shards (temp name → fsync → rename) and the embedded Fashion-MNIST lake."""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image
from webdataset import TarWriter

from streamssl.streams.fashion_mnist import load_fashion_mnist


def cache_root() -> Path:
    return Path(os.environ.get("STREAMSSL_HOME") or Path.home() / ".cache" / "streamssl")


def write_shard(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Writes a tar shard so that readers see all of it or none: temp name, fsync, rename."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp")
    count = 0
    with open(temp, "wb") as handle:
        with TarWriter(handle, encoder=False) as writer:
            for key, fields in samples:
                writer.write({"__key__": key, **fields})
                count += 1
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    return count


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def build_lake(out_dir: Path, images: np.ndarray, labels: np.ndarray, *, shard_size: int = 1000,
               key_prefix: str = "fmnist-train", split: str = "train") -> list[Path]:
    """PNG + json shards `shard-000000.tar`, …; the label is stored for evaluation only."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for number, start in enumerate(range(0, len(images), shard_size)):
        samples = (
            (f"{key_prefix}-{index:06d}",
             {"png": png_bytes(images[index]),
              "json": json.dumps({"label": int(labels[index]), "split": split, "index": index}).encode()})
            for index in range(start, min(start + shard_size, len(images)))
        )
        shard = out_dir / f"shard-{number:06d}.tar"
        write_shard(shard, samples)
        shards.append(shard)
    return shards


def default_lake(root: Path | None = None, limit: int | None = None) -> Path:
    """The embedded Fashion-MNIST train lake, written on first use (whole or not at all) and reused after."""
    name = "fashion-mnist-train" + (f"-{limit}" if limit else "")
    lake = Path(root or cache_root() / "lakes") / name
    if lake.is_dir():
        return lake
    images, labels = load_fashion_mnist("train")
    if limit:
        images, labels = images[:limit], labels[:limit]
    temp = lake.with_name(f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(temp, ignore_errors=True)
    build_lake(temp, images, labels)
    try:
        os.replace(temp, lake)
    except OSError:  # another process finished first: use its lake
        shutil.rmtree(temp, ignore_errors=True)
    return lake
