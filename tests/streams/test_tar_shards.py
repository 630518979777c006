"""Reading one tar shard (streams/tar_shards.py) through WebDatasetSource: a member over the size limit is
refused from its header, never read into memory."""

from __future__ import annotations

import tarfile
import tracemalloc
from pathlib import Path

from streamssl.streams.lake import write_shard
from streamssl.streams.webdataset_source import WebDatasetSource

LIMIT = 1024
BIG = 4 << 20  # the oversized member; the reader's peak must stay far below it


def test_a_member_over_the_limit_is_dead_lettered_unread_and_its_neighbours_come_through(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    lake.mkdir()
    shard = lake / "shard-000000.tar"
    write_shard(shard, [("a", {"txt": b"first"}), ("b", {"png": bytes(BIG), "txt": b"big"}), ("c", {"txt": b"last"})])
    with tarfile.open(shard) as archive:
        assert archive.getmember("b.png").size == BIG
    rejects: list[tuple[str, str, str, str, int]] = []
    source = WebDatasetSource(str(lake), mode="once", max_record_bytes=LIMIT,
                              on_reject=lambda shard, key, reason, detail="", payload=b"": rejects.append(
                                  (shard, key, reason, detail, source.state_dict()["sample_index"])))
    tracemalloc.start()
    try:
        records = list(source)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(r.key, r.fields) for r in records] == [("a", {"txt": b"first"}), ("c", {"txt": b"last"})]
    # reported once, with the reason and detail a record refused after reading gets, and with the position past it
    assert rejects == [(str(shard), "b", "oversized_record", f"{BIG} bytes > data.max_record_bytes {LIMIT}", 2)]
    assert peak < BIG // 8, f"peak {peak} bytes: the {BIG}-byte member was read"


def test_without_a_limit_a_big_member_is_read_as_before(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    lake.mkdir()
    write_shard(lake / "shard-000000.tar", [("a", {"bin": bytes(8 * LIMIT)}), ("b", {"txt": b"x"})])
    records = list(WebDatasetSource(str(lake), mode="once"))
    assert [(r.key, len(next(iter(r.fields.values())))) for r in records] == [("a", 8 * LIMIT), ("b", 1)]
