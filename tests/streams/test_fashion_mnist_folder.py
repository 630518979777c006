"""STREAMSSL_FASHION_MNIST decides, in one place, which Fashion-MNIST copy every reader uses (the demo lake too)."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from streamssl.streams.fashion_mnist import DEBIAN_ROOT, fashion_mnist_folder, load_fashion_mnist
from streamssl.streams.lake import default_lake
from streamssl.streams.records import SourceError
from streamssl.streams.webdataset_source import WebDatasetSource

FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz")


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """A copy of our own: 12 train and 5 test images (pixel value = index), labels index % 10."""
    folder = tmp_path / "my-fashion-mnist"
    folder.mkdir()
    for prefix, count in (("train", 12), ("t10k", 5)):
        _idx(folder / f"{prefix}-images-idx3-ubyte.gz", np.arange(count).repeat(28 * 28).reshape(count, 28, 28))
        _idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    return folder


def test_the_variable_is_honoured_when_the_demo_lake_is_built(copy: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMSSL_FASHION_MNIST", str(copy))
    monkeypatch.setenv("STREAMSSL_HOME", str(tmp_path / "home"))
    assert fashion_mnist_folder() == copy
    images, labels = load_fashion_mnist("test")
    assert images.shape == (5, 28, 28) and labels.tolist() == [0, 1, 2, 3, 4]
    lake = default_lake()
    assert lake == tmp_path / "home" / "lakes" / "fashion-mnist-train"
    assert [record.key for record in WebDatasetSource(str(lake), mode="once")] == [
        f"fmnist-train-{i:06d}" for i in range(12)]  # our 12 images, not the 60,000 of another copy


def test_a_named_folder_without_the_files_is_an_error_not_a_fallback(copy: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (copy / FILES[3]).unlink()
    monkeypatch.setenv("STREAMSSL_FASHION_MNIST", str(copy))
    with pytest.raises(SourceError, match=f"{FILES[3]} not found in {copy} \\(\\$STREAMSSL_FASHION_MNIST\\)"):
        load_fashion_mnist("train")  # even the split whose files are there: a half copy is a mistake to report
    with pytest.raises(SourceError, match=f"not found in {tmp_path}$"):
        fashion_mnist_folder(str(tmp_path))  # an explicit root, too
    monkeypatch.delenv("STREAMSSL_FASHION_MNIST")
    expected = DEBIAN_ROOT if all((DEBIAN_ROOT / name).is_file() for name in FILES) else None
    assert fashion_mnist_folder() == expected


def test_the_shell_sees_the_same_answer(copy: Path) -> None:
    """What the Makefile's `data` target asks before it would install Debian's package."""
    def ask(value: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "streamssl.streams.fashion_mnist"], capture_output=True,
                              text=True, timeout=60, env={**os.environ, "STREAMSSL_FASHION_MNIST": value})

    found = ask(str(copy))
    assert (found.returncode, found.stdout.strip()) == (0, str(copy))
    missing = ask(str(copy / "nowhere"))
    assert missing.returncode == 2 and missing.stderr.startswith("streamssl: error: Fashion-MNIST files ")
