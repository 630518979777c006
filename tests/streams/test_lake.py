"""Lakes on disk: atomic shard writes, PNG + json lakes, the cached Fashion-MNIST lake, the idx loader."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from streamssl.streams.fashion_mnist import load_fashion_mnist, read_idx
from streamssl.streams.lake import build_lake, cache_root, default_lake, write_shard
from streamssl.streams.records import SourceError
from streamssl.streams.webdataset_source import WebDatasetSource


def test_write_shard_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    count = write_shard(tmp_path / "shard-000000.tar", ((f"k{i}", {"txt": b"x"}) for i in range(3)))
    assert count == 3 and [p.name for p in tmp_path.iterdir()] == ["shard-000000.tar"]

    def broken():
        yield "k0", {"txt": b"x"}
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError):
        write_shard(tmp_path / "shard-000001.tar", broken())
    with pytest.raises(ValueError, match=r"contains '\.'"):
        write_shard(tmp_path / "shard-000002.tar", [("a.b", {"txt": b"x"})])
    assert [p.name for p in tmp_path.iterdir()] == ["shard-000000.tar"]  # neither a half shard nor a temp


def test_build_lake_round_trip(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(250, 28, 28), dtype=np.uint8)
    labels = np.arange(250) % 10
    shards = build_lake(tmp_path, images, labels, shard_size=100, key_prefix="demo", split="test")
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    records = list(WebDatasetSource(str(tmp_path), mode="once"))
    assert [r.key for r in records] == [f"demo-{i:06d}" for i in range(250)]
    assert [r.index for r in records[98:102]] == [98, 99, 0, 1]
    for record in records[::61]:
        meta = json.loads(record.fields["json"])
        assert meta == {"label": int(labels[meta["index"]]), "split": "test", "index": meta["index"]}
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(record.fields["png"]))), images[meta["index"]])


def test_default_lake_is_built_once_under_the_cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMSSL_HOME", str(tmp_path))
    assert cache_root() == tmp_path
    lake = default_lake(limit=300)
    assert lake == tmp_path / "lakes" / "fashion-mnist-train-300"
    assert [p.name for p in (tmp_path / "lakes").iterdir()] == [lake.name]  # no temp dir left behind
    images, labels = load_fashion_mnist("train")
    records = list(WebDatasetSource(str(lake), mode="once"))
    assert len(records) == 300 and records[-1].key == "fmnist-train-000299"
    meta = json.loads(records[123].fields["json"])
    assert meta == {"label": int(labels[123]), "split": "train", "index": 123}
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(records[123].fields["png"]))), images[123])
    stamp = (lake / "shard-000000.tar").stat().st_mtime_ns
    assert default_lake(limit=300) == lake and (lake / "shard-000000.tar").stat().st_mtime_ns == stamp


def test_fashion_mnist_arrays() -> None:
    for split, count in (("train", 60000), ("test", 10000)):
        images, labels = load_fashion_mnist(split)
        assert images.shape == (count, 28, 28) and images.dtype == np.uint8 and images.flags.writeable
        assert labels.shape == (count,) and labels.dtype == np.int64 and set(labels.tolist()) == set(range(10))


def test_fashion_mnist_errors_are_readable(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="unknown Fashion-MNIST split"):
        load_fashion_mnist("validation")
    with pytest.raises(SourceError, match=f"not found in {tmp_path}"):
        load_fashion_mnist("test", str(tmp_path))
    broken = tmp_path / "broken-idx1-ubyte.gz"
    broken.write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2])))  # says 5 labels, holds 2
    with pytest.raises(SourceError, match="header says"):
        read_idx(broken)
