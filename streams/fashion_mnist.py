"""Fashion-MNIST as uint8 arrays: Debian's `dataset-fashion-mnist` files, or torchvision's download."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from streamssl.streams.records import SourceError

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format: magic, dims as big-endian int32, then uint8 data)."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()  # writable


def load_fashion_mnist(split: str, root: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,28,28], labels int64 [N]) of split "train" or "test"."""
    if split not in _FILES:
        raise SourceError(f"unknown Fashion-MNIST split '{split}' (train or test)")
    image_file, label_file = _FILES[split]
    for folder in [Path(root)] if root else [DEBIAN_ROOT]:
        if (folder / image_file).is_file() and (folder / label_file).is_file():
            return read_idx(folder / image_file), read_idx(folder / label_file).astype(np.int64)
    if root:
        raise SourceError(f"Fashion-MNIST files not found in {root}")
    return _torchvision_download(split)


def _torchvision_download(split: str) -> tuple[np.ndarray, np.ndarray]:
    from torchvision.datasets import FashionMNIST

    cache = Path(os.environ.get("STREAMSSL_HOME") or Path.home() / ".cache" / "streamssl") / "torchvision"
    try:
        dataset = FashionMNIST(str(cache), train=split == "train", download=True)
    except Exception as err:  # no network, proxy, disk: all end the same way for the user
        raise SourceError(f"Fashion-MNIST not found in {DEBIAN_ROOT} and download failed: {err}") from None
    return dataset.data.numpy(), dataset.targets.numpy().astype(np.int64)
