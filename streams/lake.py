"""Writing WebDataset lakes: atomic shards (temp name → fsync → rename) and the embedded Fashion-MNIST lake."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image
from webdataset import TarWriter

from streamssl.streams.fashion_mnist import load_fashion_mnist
from streamssl.streams.files import atomic_write


def cache_root() -> Path:
    """Where streamssl keeps built lakes and downloads: `$STREAMSSL_HOME`, else `~/.cache/streamssl`."""
    return Path(os.environ.get("STREAMSSL_HOME") or Path.home() / ".cache" / "streamssl")


def write_shard(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Writes a tar shard that readers see whole or not at all.

    The tar is written under a hidden temp name in the same directory (readers skip those), synced,
    then renamed into place, so a follow-mode reader never opens a half-written shard.

    Args:
        path: Final shard path, e.g. `lake/shard-000042.tar`.
        samples: (key, {extension: bytes}) pairs. A key may not contain "." in its last path part:
            readers split a member name at the first dot into key and extension.

    Returns:
        The number of samples written.
    """
    path = Path(path)
    count = 0
    # A whole-second mtime: TarWriter's default float time adds a pax header to every member,
    # which doubles the size of a lake of small PNGs.
    with atomic_write(path) as stream, TarWriter(stream, encoder=False, mtime=int(time.time())) as writer:
        for key, fields in samples:
            if "." in key.rsplit("/", 1)[-1]:
                raise ValueError(f"sample key {key!r} contains '.', which readers take for an extension")
            writer.write({"__key__": key, **fields})
            count += 1
    return count


def png_bytes(image: np.ndarray) -> bytes:
    """A greyscale uint8 [H,W] image as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")  # uint8 [H,W] maps to mode "L"
    return buffer.getvalue()


def build_lake(out_dir: Path, images: np.ndarray, labels: np.ndarray, *, shard_size: int = 1000,
               key_prefix: str = "fmnist-train", split: str = "train", order: np.ndarray | None = None) -> list[Path]:
    """Writes images as shards `shard-000000.tar`, … of PNG + json samples.

    Args:
        out_dir: Lake directory (created if missing).
        images: uint8 [N,H,W] greyscale images.
        labels: [N] integer labels; stored in the json for evaluation only, training never reads them.
        shard_size: Samples per shard.
        key_prefix: Sample keys are `{key_prefix}-{index:06d}` (no dots).
        split: Written into every sample's json.
        order: Which images, in which order (streams/orders.py); default all, as given. Keys and the json's
            "index" keep each image's index into `images`.

    Returns:
        The shard paths, in order.
    """
    if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(labels):
        raise ValueError(f"need uint8 images [N,H,W] and N labels, got {images.dtype} {images.shape}, {len(labels)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    order = np.arange(len(images)) if order is None else order
    for number, start in enumerate(range(0, len(order), shard_size)):
        samples = (
            (f"{key_prefix}-{index:06d}",
             {"png": png_bytes(images[index]),
              "json": json.dumps({"label": int(labels[index]), "split": split, "index": index}).encode()})
            for index in map(int, order[start:start + shard_size])
        )
        shard = out_dir / f"shard-{number:06d}.tar"
        write_shard(shard, samples)
        shards.append(shard)
    return shards


def default_lake(root: Path | None = None, limit: int | None = None) -> Path:
    """The embedded Fashion-MNIST train lake, built on first use and reused after.

    The lake is built in a hidden sibling directory and renamed into place, so a crash half-way never
    leaves a half lake behind for the next run to trust.

    Args:
        root: Folder holding the lakes; default `cache_root() / "lakes"`.
        limit: Only the first `limit` training images (a small lake for tests), in its own folder.

    Returns:
        `root/fashion-mnist-train`, or `root/fashion-mnist-train-{limit}`.
    """
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    name = "fashion-mnist-train" + (f"-{limit}" if limit is not None else "")
    lake = Path(root or cache_root() / "lakes") / name
    if lake.is_dir():
        return lake
    images, labels = load_fashion_mnist("train")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    lake.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(dir=lake.parent, prefix=f".{name}.", suffix=".tmp"))
    try:
        build_lake(temp, images, labels)
        os.rename(temp, lake)
    except OSError:
        if not lake.is_dir():
            raise
        # another process finished first: its lake is as good as ours
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return lake
