"""Loading: `data.source` parsed into a `SourceSpec`; the background loader's messages in stream order, each
reject with a position a checkpoint can resume from, dead-lettered by the loop."""

from __future__ import annotations

import io
import json
from functools import partial
from pathlib import Path

import pytest
from PIL import Image

from streamssl.pipeline.images import Trainer
from streamssl.pipeline.loading.loader import BatchLoader
from streamssl.pipeline.loading.messages import Batch, End, Message, Reject
from streamssl.pipeline.loading.positions import Position
from streamssl.pipeline.loading.sources import SourceSpec, parse_source, resolve_mode
from streamssl.streams.lake import write_shard
from streamssl.streams.records import SourceError
from streamssl.streams.webdataset_source import WebDatasetSource
from tests.conftest import read_to_end, tiny_config


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


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (28, 28), color=value).save(buffer, format="PNG")
    return buffer.getvalue()


def _messages(lake: Path, position: Position | None) -> list[Message]:
    return read_to_end(BatchLoader(partial(WebDatasetSource, str(lake), mode="once"), position, 4, "png", 1, 28), 20)


def test_loader_rejects_carry_positions_that_skip_no_record_and_reach_the_dead_letters(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    lake.mkdir()
    good = [(f"g{index:02d}", {"png": _png(index * 20)}) for index in range(12)]
    # Batches of 4: g00-g03, then bad-a with nothing waiting, then g04 g05 waiting when bad-b comes.
    write_shard(lake / "shard-000000.tar", [*good[:4], ("bad-a", {"png": b"garbage"}), *good[4:6],
                                            ("bad-b", {"json": b"{}"}), *good[6:]])
    (lake / "shard-000001.tar").write_bytes(b"not a tar file" * 100)  # rejected by the source itself
    messages = _messages(lake, None)
    assert [type(message) for message in messages] == [Batch, Reject, Reject, Batch, Batch, Reject, End]
    bad_a, bad_b, shard = (message for message in messages if isinstance(message, Reject))
    assert (bad_a.key, bad_a.reason, bad_a.position.sample_index) == ("bad-a", "corrupt_image", 5)  # right after it
    assert (bad_b.key, bad_b.reason) == ("bad-b", "missing_image")
    assert bad_b.position == bad_a.position  # not past g04 and g05, which no batch holds yet
    assert (shard.reason, shard.position.shard) == ("unreadable_shard", str(lake / "shard-000001.tar"))
    # A run checkpointed right after either reject resumes with exactly the batch that came next.
    for reject in (bad_a, bad_b):
        assert next(m for m in _messages(lake, reject.position) if isinstance(m, Batch)).keys == messages[3].keys

    trainer = Trainer(tiny_config(tmp_path / "run", lake, "data.mode=once", "data.shuffle_buffer=0"))
    for message in (bad_a, bad_b, shard):
        assert trainer.receive(message) == ""
        assert trainer.state.position is message.position
    letters = [json.loads(line) for line in (tmp_path / "run" / "dead-letter.jsonl").read_text().splitlines()]
    assert [(letter["key"], letter["reason"]) for letter in letters] == [
        ("bad-a", "corrupt_image"), ("bad-b", "missing_image"), ("", "unreadable_shard")]
    assert letters[0]["source"].endswith("shard-000000.tar") and trainer.dead_letters.counts == {
        "corrupt_image": 1, "missing_image": 1, "unreadable_shard": 1}
