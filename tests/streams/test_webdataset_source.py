"""WebDatasetSource on real shards on disk: order, shuffling, exact positions, follow mode, bad shards."""

from __future__ import annotations

import gzip
import io
import itertools
import os
import tarfile
import threading
import time
from pathlib import Path

import pytest
import torch

from streamssl.streams.lake import write_shard
from streamssl.streams.records import SourceError
from streamssl.streams.webdataset_source import WebDatasetSource

SHARDS, PER_SHARD = 4, 10
ALL_KEYS = sorted(f"s{n}-{i:03d}" for n in range(SHARDS) for i in range(PER_SHARD))


def _shard(path: Path, prefix: str, count: int) -> Path:
    write_shard(path, [(f"{prefix}-{i:03d}", {"txt": f"{prefix}:{i}".encode(), "bin": os.urandom(600)})
                       for i in range(count)])
    return path


@pytest.fixture
def lake(tmp_path: Path) -> Path:
    directory = tmp_path / "lake"
    directory.mkdir()
    for number in range(SHARDS):
        _shard(directory / f"shard-{number:06d}.tar", f"s{number}", PER_SHARD)
    return directory


def _keys(source: WebDatasetSource, count: int) -> list[str]:
    return [record.key for record in itertools.islice(source, count)]


class Rejects(list):
    """on_reject that remembers (shard name, key, reason)."""

    def __call__(self, source: str, key: str, reason: str) -> None:
        self.append((Path(source).name, key, reason))


def _wait_for(condition, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_cycle_yields_every_sample_once_per_pass_in_reshuffled_shard_order(lake: Path) -> None:
    source = WebDatasetSource(str(lake), mode="cycle", seed=3)
    first, second = _keys(source, 40), _keys(source, 40)
    assert sorted(first) == sorted(second) == ALL_KEYS
    shard_order = [[key[:2] for key in keys[::PER_SHARD]] for keys in (first, second)]
    assert shard_order[0] != shard_order[1]  # each pass draws its own shard order
    assert first[:PER_SHARD] == [f"{first[0][:2]}-{i:03d}" for i in range(PER_SHARD)]  # samples in stream order
    assert _keys(WebDatasetSource(str(lake), seed=3), 80) == first + second
    assert _keys(WebDatasetSource(str(lake), seed=4), 80) != first + second


def test_shuffle_buffer_is_seeded_and_mixes_shards(lake: Path) -> None:
    keys = _keys(WebDatasetSource(str(lake), shuffle_buffer=16, seed=1), 100)
    assert keys == _keys(WebDatasetSource(str(lake), shuffle_buffer=16, seed=1), 100)
    assert keys != _keys(WebDatasetSource(str(lake), shuffle_buffer=16, seed=2), 100)
    assert keys[:40] != _keys(WebDatasetSource(str(lake), seed=1), 40)
    assert len({key[:2] for key in keys[:10]}) > 1  # records from different shards interleave


def test_once_reads_in_name_order_and_ends(lake: Path) -> None:
    records = list(WebDatasetSource(str(lake), mode="once"))
    assert sorted(r.key for r in records) == ALL_KEYS and records[0].key == "s0-000"
    assert records[12].source == str(lake / "shard-000001.tar") and records[12].index == 2
    assert records[12].fields["txt"] == b"s1:2" and set(records[12].fields) == {"txt", "bin"}


def test_specs_patterns_urls_and_bad_settings(lake: Path) -> None:
    pattern = str(lake / "shard-{000001..000002}.tar")
    assert len(list(WebDatasetSource(pattern, mode="once"))) == 20
    assert len(list(WebDatasetSource("file://" + pattern, mode="once"))) == 20
    assert len(list(WebDatasetSource(f"pipe:cat {lake}/shard-000003.tar", mode="once"))) == 10
    with pytest.raises(SourceError, match=r"^data path not found: .*missing$"):
        WebDatasetSource(str(lake.parent / "missing"))
    with pytest.raises(SourceError, match="data path not found"):
        WebDatasetSource(str(lake / "nope-{0..3}.tar"))
    with pytest.raises(SourceError, match="follow mode needs a local directory"):
        WebDatasetSource(pattern, mode="follow")
    with pytest.raises(SourceError, match="unknown data mode"):
        WebDatasetSource(str(lake), mode="epochs")


@pytest.mark.parametrize(("mode", "buffer", "taken", "then"), [
    ("cycle", 16, 7, 12),  # inside a shard, records waiting in the buffer
    ("cycle", 16, 33, 30),  # in pass 0, continuing across the pass boundary
    ("cycle", 16, 47, 12),  # in pass 1
    ("cycle", 0, 20, 25),  # exactly at a shard boundary, no buffer
    ("once", 8, 19, 21),
    ("follow", 8, 23, 17),  # inside a shard
    ("follow", 8, 36, 4),  # while the buffer drains at the end of the lake
])
def test_state_dict_resumes_exactly(lake: Path, mode: str, buffer: int, taken: int, then: int) -> None:
    def make() -> WebDatasetSource:
        return WebDatasetSource(str(lake), mode=mode, shuffle_buffer=buffer, seed=1)

    straight = list(itertools.islice(make(), taken + then))
    first = make()
    assert _keys(first, taken) == [r.key for r in straight[:taken]]
    # The state goes through the checkpoint format: torch.save, then a weights_only load.
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)
    resumed = make()
    resumed.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    assert list(itertools.islice(resumed, then)) == straight[taken:]


def test_state_dict_is_shallow_and_an_empty_state_is_a_fresh_start(lake: Path) -> None:
    source = WebDatasetSource(str(lake), shuffle_buffer=16, seed=1)
    records = list(itertools.islice(source, 5))
    state = source.state_dict()
    assert (state["mode"], state["cycle"], state["shard_index"], state["sample_index"]) == ("cycle", 0, 2, 1)
    assert state["shard"] == state["order"][2] and len(state["buffer"]) == 16
    again = source.state_dict()  # taken every batch: shares the buffered records, copies none
    assert again["buffer"] is not state["buffer"]
    assert all(a is b for a, b in zip(again["buffer"], state["buffer"], strict=True))
    fresh = WebDatasetSource(str(lake), shuffle_buffer=16, seed=1)
    fresh.load_state_dict({})
    assert _keys(fresh, 5) == [r.key for r in records]
    with pytest.raises(SourceError, match="data mode 'cycle'"):
        WebDatasetSource(str(lake), mode="follow").load_state_dict(state)


def test_follow_picks_up_a_shard_that_lands_later_and_ignores_temp_names(lake: Path) -> None:
    rejects = Rejects()
    source = WebDatasetSource(str(lake), mode="follow", shuffle_buffer=4, poll_seconds=0.05, on_reject=rejects)
    seen: list[str] = []
    consumer = threading.Thread(target=lambda: seen.extend(r.key for r in source))
    consumer.start()
    try:
        assert _wait_for(lambda: len(seen) == 40)  # the buffer drained once nothing new was there

        def writer() -> None:  # another process publishing a shard: temp names first, then a rename
            partial = lake / "shard-000010.tar.tmp"
            _shard(lake / ".shard-000010.tar", "late", 5)
            partial.write_bytes((lake / ".shard-000010.tar").read_bytes()[:700])
            time.sleep(0.3)  # several polls see only the temp names
            assert source.stats()["shards_pending"] == 0
            os.replace(lake / ".shard-000010.tar", lake / "shard-000010.tar")
            partial.unlink()

        thread = threading.Thread(target=writer)
        thread.start()
        thread.join()
        assert _wait_for(lambda: len(seen) == 45)
        assert seen[40:] != [] and sorted(seen[40:]) == [f"late-{i:03d}" for i in range(5)]
        assert rejects == []
        assert source.stats() | {"shuffle_buffer": 0} == {"cycle": 0, "shard_index": 4, "sample_index": 5,
                                                           "shards_pending": 0, "shuffle_buffer": 0}
    finally:
        source.close()
        consumer.join(timeout=5)


def test_a_late_shard_named_before_the_position_is_reported_once(lake: Path) -> None:
    rejects = Rejects()
    (lake / "shard-000002.tar").rename(lake / "hold")
    source = WebDatasetSource(str(lake), mode="follow", poll_seconds=0.05, on_reject=rejects)
    iterator = iter(source)
    assert len(list(itertools.islice(iterator, 30))) == 30  # shards 0, 1 and 3
    (lake / "hold").rename(lake / "shard-000002.tar")
    _shard(lake / "shard-000004.tar", "s4", 3)
    assert [next(iterator).key for _ in range(3)] == ["s4-000", "s4-001", "s4-002"]
    assert rejects == [("shard-000002.tar", "", "out_of_order_shard")]
    _shard(lake / "shard-000005.tar", "s5", 1)
    assert next(iterator).key == "s5-000" and len(rejects) == 1  # reported once, not on every listing
    source.close()


def test_close_unblocks_a_waiting_follow_iteration(lake: Path) -> None:
    source = WebDatasetSource(str(lake), mode="follow", poll_seconds=30)
    seen: list[str] = []
    consumer = threading.Thread(target=lambda: seen.extend(r.key for r in source), daemon=True)
    consumer.start()
    assert _wait_for(lambda: len(seen) == 40)
    time.sleep(0.1)  # now waiting out its 30 s poll
    started = time.monotonic()
    source.close()
    consumer.join(timeout=2)
    assert not consumer.is_alive() and time.monotonic() - started < 1


def test_a_truncated_shard_yields_its_complete_samples_then_is_reported(lake: Path) -> None:
    whole = list(WebDatasetSource(str(lake / "shard-000001.tar"), mode="once"))
    data = (lake / "shard-000001.tar").read_bytes()
    with tarfile.open(lake / "shard-000001.tar") as archive:
        last = archive.getmembers()[-1]
    data_end = last.offset_data + last.size  # later cuts only lose end-of-archive zeros
    # Cuts inside headers, inside data, and exactly at member boundaries (which tarfile reads as a normal end).
    for cut in [100, 512, 700, 1024, 1536, 2048, 4096, *range(3000, data_end, 1531), data_end - 1]:
        shard = lake.parent / f"cut-{cut}.tar"
        shard.write_bytes(data[:cut])
        rejects = Rejects()
        got = list(WebDatasetSource(str(shard), mode="once", on_reject=rejects))
        assert got == [
            type(r)(r.key, r.fields, str(shard), r.index) for r in whole[: len(got)]
        ], f"cut at {cut}: an incomplete or altered sample came through"
        last_key = got[-1].key if got else ""
        expected = "truncated_shard" if got or cut >= 512 else "unreadable_shard"
        assert rejects == [(shard.name, last_key, expected)], f"cut at {cut}"


def test_unreadable_and_vanished_shards_are_reported_and_skipped(lake: Path) -> None:
    (lake / "shard-000001.tar").write_bytes(b"not a tar at all\n" * 100)
    (lake / "shard-000002.tar").write_bytes(b"")
    (lake / "shard-000004.tar").write_bytes(gzip.compress((lake / "shard-000000.tar").read_bytes()))
    rejects = Rejects()
    source = WebDatasetSource(str(lake), mode="once", on_reject=rejects)
    iterator = iter(source)
    assert next(iterator).key == "s0-000"  # shards listed; now one disappears before it is opened
    (lake / "shard-000003.tar").unlink()
    keys = ["s0-000", *(r.key for r in iterator)]
    assert keys == [f"s0-{i:03d}" for i in range(10)] * 2  # shard 4 is a gzipped copy of shard 0
    assert rejects == [("shard-000001.tar", "", "unreadable_shard"), ("shard-000002.tar", "", "unreadable_shard"),
                       ("shard-000003.tar", "", "shard_vanished")]


def test_cycle_over_nothing_readable_fails_instead_of_spinning(tmp_path: Path) -> None:
    (tmp_path / "shard-000000.tar").write_bytes(b"garbage" * 100)
    rejects = Rejects()
    with pytest.raises(SourceError, match="no readable samples"):
        list(WebDatasetSource(str(tmp_path), mode="cycle", on_reject=rejects))
    assert rejects == [("shard-000000.tar", "", "unreadable_shard")]


def test_stats_report_position_and_pending_shards(lake: Path) -> None:
    source = WebDatasetSource(str(lake), mode="cycle", seed=0)
    _keys(source, 13)
    assert source.stats() == {"cycle": 0, "shard_index": 1, "sample_index": 3, "shards_pending": 2,
                              "shuffle_buffer": 0}
    _keys(source, 40)
    assert source.stats()["cycle"] == 1
