"""A followed directory that runs dry says so: once, then every few minutes, and again after new shards."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from streamssl.streams import waiting
from streamssl.streams.lake import png_bytes, write_shard
from streamssl.streams.records import Record
from streamssl.streams.webdataset_source import WebDatasetSource


def _shard(path: Path, count: int) -> None:
    image = png_bytes(np.zeros((4, 4), dtype=np.uint8))
    write_shard(path, ((f"{path.stem}-{i}", {"png": image}) for i in range(count)))


def _messages(caplog: pytest.LogCaptureFixture, lake: Path) -> list[str]:
    return [r.getMessage() for r in caplog.records if f"waiting for new shards in {lake}" in r.getMessage()]


def _wait_for(condition: Callable[[], object], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_follow_mode_logs_waiting_once_then_every_few_minutes(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(waiting, "REPEAT_SECONDS", 0.5)  # "every few minutes", compressed for the test
    lake = tmp_path / "lake"
    lake.mkdir()
    _shard(lake / "shard-000000.tar", 3)
    source = WebDatasetSource(str(lake), mode="follow", poll_seconds=0.05)
    records: list[Record] = []
    reader = threading.Thread(target=lambda: records.extend(source), daemon=True)
    with caplog.at_level(logging.INFO, logger="streamssl.streams"):
        reader.start()
        try:
            _wait_for(lambda: len(records) == 3 and _messages(caplog, lake))
            time.sleep(0.3)  # six more empty listings, inside the repeat interval: still one line
            assert _messages(caplog, lake) == [f"waiting for new shards in {lake}"]
            _wait_for(lambda: len(_messages(caplog, lake)) == 2)
            assert _messages(caplog, lake)[1].startswith(f"still waiting for new shards in {lake} (nothing new for ")
            _shard(lake / "shard-000001.tar", 2)  # a shard lands: read, then the wait starts over with its first line
            _wait_for(lambda: len(records) == 5 and len(_messages(caplog, lake)) == 3)
            assert _messages(caplog, lake)[2] == f"waiting for new shards in {lake}"
        finally:
            source.close()
            reader.join(5)
    assert [r.key for r in records] == ["shard-000000-0", "shard-000000-1", "shard-000000-2",
                                        "shard-000001-0", "shard-000001-1"]


def test_a_lake_read_in_cycle_mode_never_logs_waiting(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _shard(tmp_path / "shard-000000.tar", 2)
    with caplog.at_level(logging.INFO, logger="streamssl.streams"):
        assert len(list(WebDatasetSource(str(tmp_path / "shard-000000.tar"), mode="once"))) == 2
    assert not [r for r in caplog.records if "waiting" in r.getMessage()]
