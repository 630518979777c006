"""Loading: `data.source` parsed into a `SourceSpec`."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamssl.pipeline.loading.sources import SourceSpec, parse_source, resolve_mode
from streamssl.streams.records import SourceError


def test_every_kind_of_data_source_is_told_apart_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lake").mkdir()
    assert parse_source("") == SourceSpec("embedded")
    lake = parse_source("lake")
    assert (lake.kind, lake.path, lake.is_local_directory) == ("lake", "lake", True)
    assert not parse_source("lake/shard-{000000..000009}.tar").is_local_directory
    assert not parse_source("file://lake").is_local_directory
    kafka = parse_source("kafka://a:9092,b:9093/points?group=g")
    assert (kafka.kind, kafka.bootstrap, kafka.topic, kafka.group) == ("kafka", ("a:9092", "b:9093"), "points", "g")
    ray = parse_source("ray+parquet://lake")
    assert (ray.kind, ray.ray_format, ray.path, ray.text) == ("ray", "parquet", str(tmp_path / "lake"), "ray+parquet://lake")
    assert (resolve_mode(lake, "auto"), resolve_mode(parse_source(""), "auto"), resolve_mode(lake, "once")) == (
        "follow", "cycle", "once")
    for bad in ("kafka://a/points", "ray+csv://lake", "ray+webdataset://no/such/lake"):
        with pytest.raises(SourceError):
            parse_source(bad)
