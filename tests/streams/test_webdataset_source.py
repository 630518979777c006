"""WebDatasetSource on real shards on disk: order, shuffling, exact positions, follow mode, bad shards."""

from __future__ import annotations

import gzip
import io
import itertools
import json
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


def _keys_within(source: WebDatasetSource, count: int, seconds: float = 10) -> list[str]:
    """Up to `count` keys of a follow source; fewer if they do not come within `seconds` (it is closed then)."""
    timer = threading.Timer(seconds, source.close)
    timer.start()
    try:
        return _keys(source, count)
    finally:
        timer.cancel()


class Rejects(list):
    """on_reject that remembers (shard name, key, reason), and the details by shard name."""

    def __init__(self) -> None:
        super().__init__()
        self.details: dict[str, str] = {}

    def __call__(self, source: str, key: str, reason: str, detail: str = "") -> None:
        self.append((Path(source).name, key, reason))
        self.details[Path(source).name] = detail


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


def test_a_late_shard_named_before_the_position_is_read_next_not_rejected(lake: Path) -> None:
    rejects = Rejects()
    (lake / "shard-000002.tar").rename(lake / "hold")
    source = WebDatasetSource(str(lake), mode="follow", poll_seconds=0.05, on_reject=rejects)
    iterator = iter(source)
    assert len(list(itertools.islice(iterator, 30))) == 30  # shards 0, 1 and 3
    (lake / "hold").rename(lake / "shard-000002.tar")
    _shard(lake / "shard-000004.tar", "s4", 3)
    timer = threading.Timer(10, source.close)  # the reader would wait for ever for a shard it skipped
    timer.start()
    keys = [record.key for record in itertools.islice(iterator, 13)]
    assert keys == [f"s2-{i:03d}" for i in range(10)] + ["s4-000", "s4-001", "s4-002"]  # unread names in order
    _shard(lake / "shard-000005.tar", "s5", 1)
    assert next(iterator).key == "s5-000" and rejects == []
    timer.cancel()
    assert source.state_dict()["finished"] == (("shard-", "000000", "000004", ".tar"),)  # one run, not 5 names
    source.close()


def _saved(source: WebDatasetSource) -> dict:
    """`source.state_dict()` as a checkpoint holds it: through torch.save and a weights_only load."""
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)


def test_a_shard_that_lands_under_an_earlier_name_while_the_reader_is_down_is_read_after_resume(lake: Path) -> None:
    (lake / "shard-000002.tar").rename(lake / "hold")
    first = WebDatasetSource(str(lake), mode="follow", shuffle_buffer=4, poll_seconds=0.05)
    seen = _keys(first, 30)  # shards 0, 1 and 3, the buffer drained
    state = _saved(first)
    assert state["finished"] == (("shard-", "000000", "000001", ".tar"), ("shard-", "000003", "000003", ".tar"))
    (lake / "hold").rename(lake / "shard-000002.tar")  # lands while nothing reads the lake
    rejects = Rejects()
    resumed = WebDatasetSource(str(lake), mode="follow", shuffle_buffer=4, poll_seconds=0.05, on_reject=rejects)
    resumed.load_state_dict(state)
    seen += _keys_within(resumed, 10)
    assert sorted(seen) == ALL_KEYS and rejects == []
    assert resumed.state_dict()["finished"] == (("shard-", "000000", "000003", ".tar"),)
    resumed.close()


def test_a_follow_position_saved_before_finished_names_resumes_as_it_did(lake: Path) -> None:
    source = WebDatasetSource(str(lake), mode="follow", poll_seconds=0.05)
    _keys(source, 25)  # inside shard 2
    state = _saved(source)
    del state["finished"]  # as written before positions had it: every shard named before `shard` was read
    resumed = WebDatasetSource(str(lake), mode="follow", poll_seconds=0.05)
    resumed.load_state_dict(state)
    assert _keys(resumed, 15) == [f"s2-{i:03d}" for i in range(5, 10)] + [f"s3-{i:03d}" for i in range(10)]
    assert resumed.state_dict()["finished"] == (("shard-", "000000", "000002", ".tar"),)  # shard 3 is being read
    resumed.close()


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


def _tampered(state: dict, marker: Path, lake: Path) -> list[dict]:
    """`state` with one shard it would open swapped for another's: commands, URLs, paths outside the lake."""
    command = f"pipe:touch {marker}; cat {lake}/shard-000000.tar"
    outside = lake.parent / "elsewhere"
    outside.mkdir(exist_ok=True)
    (outside / "shard-000000.tar").write_bytes((lake / "shard-000000.tar").read_bytes())
    swaps = [command, f"file://{lake}/shard-000000.tar", f"{lake}/../elsewhere/shard-000000.tar",
             str(outside / "shard-000000.tar"), f"{lake}/.shard-000000.tar", f"{lake}/shard-000000.tar.tmp"]
    tampered = []
    for swap in swaps:
        tampered.append({**state, "shard": swap})
        if state["order"]:
            tampered.append({**state, "order": (swap, *state["order"][1:])})
    return tampered


@pytest.mark.parametrize("mode", ["cycle", "once", "follow"])
def test_a_saved_position_may_only_name_shards_of_the_spec(lake: Path, tmp_path: Path, mode: str) -> None:
    marker = tmp_path / "command-ran"
    source = WebDatasetSource(str(lake), mode=mode, shuffle_buffer=4, seed=1)
    expected = _keys(WebDatasetSource(str(lake), mode=mode, shuffle_buffer=4, seed=1), 20)
    assert _keys(source, 12) == expected[:12]
    state = _saved(source)
    for bad in _tampered(state, marker, lake):
        with pytest.raises(SourceError, match=r"^the run dir's stream position names shard .*, which --data .* does not"):
            WebDatasetSource(str(lake), mode=mode, shuffle_buffer=4, seed=1).load_state_dict(bad)
    assert not marker.exists()
    # The same lake spelled another way (a symlink, a trailing slash) resumes as its own spelling.
    (tmp_path / "alias").symlink_to(lake)
    for spelling in (str(tmp_path / "alias"), f"{lake}/"):
        resumed = WebDatasetSource(spelling, mode=mode, shuffle_buffer=4, seed=1)
        resumed.load_state_dict(state)
        assert _keys_within(resumed, 8) == expected[12:]
        assert resumed.state_dict()["shard"].startswith(spelling.rstrip("/") + "/")


def test_a_pattern_or_url_spec_resumes_only_its_own_urls(lake: Path, tmp_path: Path) -> None:
    marker = tmp_path / "command-ran"
    command = f"pipe:cat {lake}/shard-000003.tar"
    spec = "{" + f"{lake}/shard-000001.tar,{command}" + "}"
    source = WebDatasetSource(spec, mode="once")
    assert len(_keys(source, 15)) == 15 and source.state_dict()["shard"] == command
    state = _saved(source)
    WebDatasetSource(spec, mode="once").load_state_dict(state)  # the spec's own pipe: is the user's choice
    narrower = WebDatasetSource(str(lake / "shard-{000001..000002}.tar"), mode="once")
    with pytest.raises(SourceError, match="names shard 'pipe:cat"):
        narrower.load_state_dict(state)
    with pytest.raises(SourceError, match="names shard 'pipe:touch"):
        narrower.load_state_dict({**state, "order": (f"pipe:touch {marker}",), "shard": None})
    assert not marker.exists()
    # A shard file beside the spec's files is the same lake's: a worker of a group gets a list of a directory's
    # shards, which shifts as the directory grows.
    mine = WebDatasetSource("{" + f"{lake}/shard-000000.tar,{lake}/shard-000002.tar" + "}", mode="once")
    assert len(_keys(mine, 15)) == 15
    shifted = WebDatasetSource("{" + f"{lake}/shard-000001.tar,{lake}/shard-000003.tar" + "}", mode="once")
    shifted.load_state_dict(_saved(mine))
    assert _keys(shifted, 10) == [f"s2-{i:03d}" for i in range(5, 10)]  # the saved pass ends as it was planned
    (tmp_path / "other").mkdir()
    _shard(tmp_path / "other" / "shard-000000.tar", "o", 3)
    with pytest.raises(SourceError, match=r"which --data .*other/shard-000000\.tar does not"):
        WebDatasetSource(str(tmp_path / "other" / "shard-000000.tar"), mode="once").load_state_dict(_saved(mine))


def test_a_position_of_another_lake_with_the_same_shard_names_is_refused(lake: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-lake"
    other.mkdir()
    for number in range(SHARDS):
        _shard(other / f"shard-{number:06d}.tar", f"o{number}", PER_SHARD)
    source = WebDatasetSource(str(lake), mode="follow")
    _keys(source, 15)
    with pytest.raises(SourceError, match=f"names shard '{lake}/shard-000001.tar', which --data {other} does not"):
        WebDatasetSource(str(other), mode="follow").load_state_dict(_saved(source))


@pytest.mark.parametrize("mode", ["once", "follow"])
def test_a_symlink_loop_in_the_lake_is_rejected_once_and_the_rest_is_read(lake: Path, mode: str) -> None:
    (lake / "shard-000001a.tar").symlink_to("shard-000001a.tar")  # points at itself
    (lake / "shard-000002a.tar").symlink_to("shard-000002b.tar")
    (lake / "shard-000002b.tar").symlink_to("shard-000002a.tar")
    rejects = Rejects()
    source = WebDatasetSource(str(lake), mode=mode, poll_seconds=0.05, on_reject=rejects)
    assert sorted(_keys_within(source, 40)) == ALL_KEYS
    time.sleep(0.2)  # follow: several more listings see the loops again
    source.close()
    assert rejects == [("shard-000001a.tar", "", "unreadable_shard"), ("shard-000002a.tar", "", "unreadable_shard"),
                       ("shard-000002b.tar", "", "unreadable_shard")]
    assert rejects.details["shard-000001a.tar"] == "Too many levels of symbolic links"


def test_member_names_that_are_not_utf8_are_read_with_their_bytes_spelled_out(lake: Path) -> None:
    # Written the way a tool on a Latin-1 system writes them: raw bytes, no pax header saying UTF-8.
    shard = lake / "shard-000004.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as archive:
        for name in ("caf\udce9-000.txt", "caf\udce9-000.p\udcffng", "ok-000.txt", "\udcff\udcfe-000.txt"):
            info = tarfile.TarInfo(name)
            info.size = 4
            archive.addfile(info, io.BytesIO(b"data"))
    assert b"caf\xe9-000.txt" in shard.read_bytes()
    records = [r for r in WebDatasetSource(str(lake), mode="once") if r.source == str(shard)]
    assert [(r.key, sorted(r.fields)) for r in records] == [
        ("caf\\xe9-000", ["p\\xffng", "txt"]), ("ok-000", ["txt"]), ("\\xff\\xfe-000", ["txt"])]
    for record in records:  # what ids, logs and dead letters do with a key
        record.key.encode()
        assert json.loads(json.dumps({"key": record.key}, ensure_ascii=False))["key"] == record.key
