"""Fashion-MNIST as uint8 arrays: $STREAMSSL_FASHION_MNIST's files, Debian's `dataset-fashion-mnist`, or torchvision's
download. `fashion_mnist_folder` is the one place that decides which (the demo lake, the kNN monitor, `streamssl
eval`, `streamssl lake` and the benches all read through `load_fashion_mnist`); `python -m
streamssl.streams.fashion_mnist` prints its answer for shell scripts (the Makefile's `data` target).
"""

from __future__ import annotations

import gzip
import os
import sys
from pathlib import Path

import numpy as np

from streamssl.streams.records import SourceError

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_UBYTE = 0x08  # idx type code of unsigned bytes, the only one Fashion-MNIST uses


def read_idx(path: Path) -> np.ndarray:
    """A gzipped idx file (MNIST's format: 0, 0, type, ndim, dims as big-endian int32, then the data)."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3] if len(data) >= 4 else 0
    if ndim == 0 or data[:3] != bytes([0, 0, _UBYTE]):
        raise SourceError(f"{path} is not an idx file of unsigned bytes")
    shape = tuple(int.from_bytes(data[4 + 4 * axis: 8 + 4 * axis], "big") for axis in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise SourceError(f"{path} holds {len(data) - offset} bytes of data, its header says {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape).copy()  # writable, owns its memory


def fashion_mnist_folder(root: str | None = None) -> Path | None:
    """The folder Fashion-MNIST is read from: `root`, else $STREAMSSL_FASHION_MNIST, else Debian's folder if it
    holds the files; None = torchvision's download into the streamssl cache.

    Raises:
        SourceError: A folder named by `root` or the variable lacks one of the four files (never a silent
            fallback to some other copy).
    """
    named = root or os.environ.get("STREAMSSL_FASHION_MNIST")
    folder = Path(named) if named else DEBIAN_ROOT
    missing = [name for files in _FILES.values() for name in files if not (folder / name).is_file()]
    if not missing:
        return folder
    if named:
        source = "" if root else " ($STREAMSSL_FASHION_MNIST)"
        raise SourceError(f"Fashion-MNIST files {', '.join(missing)} not found in {named}{source}")
    return None


def load_fashion_mnist(split: str, root: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One split of Fashion-MNIST.

    Args:
        split: "train" (60k) or "test" (10k).
        root: Folder with the four idx .gz files. Given but without them is an error, not a silent
            fallback to some other copy. Default: $STREAMSSL_FASHION_MNIST if set, else Debian's folder,
            else torchvision's download into the streamssl cache.

    Returns:
        (images uint8 [N,28,28], labels int64 [N]).

    Raises:
        SourceError: Unknown split, files missing or malformed, or download impossible.
    """
    if split not in _FILES:
        raise SourceError(f"unknown Fashion-MNIST split '{split}' (train or test)")
    image_file, label_file = _FILES[split]
    folder = fashion_mnist_folder(root)
    if folder is None:
        return _torchvision_download(split)
    return read_idx(folder / image_file), read_idx(folder / label_file).astype(np.int64)


def _torchvision_download(split: str) -> tuple[np.ndarray, np.ndarray]:
    # Imported here: torchvision takes seconds to import and is only needed without the Debian files;
    # lake imports this module, so importing lake at the top would be circular.
    from torchvision.datasets import FashionMNIST

    from streamssl.streams.lake import cache_root

    try:
        dataset = FashionMNIST(str(cache_root() / "torchvision"), train=split == "train", download=True)
    except Exception as err:  # no network, proxy, disk: all end the same way for the user
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SourceError(f"Fashion-MNIST not in {DEBIAN_ROOT} and torchvision's download failed: {reason}") from None
    return dataset.data.numpy(), dataset.targets.numpy().astype(np.int64)


if __name__ == "__main__":  # the folder, or exit 1 (torchvision's download will be used), or exit 2 with the error
    try:
        found = fashion_mnist_folder()
    except SourceError as err:
        print(f"streamssl: error: {err}", file=sys.stderr)
        sys.exit(2)
    if found is None:
        sys.exit(1)
    print(found)
