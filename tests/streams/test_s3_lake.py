"""`--data s3://bucket/prefix/` against a real S3 endpoint (a local moto server, tests/s3_store.py): listed and
followed like a lake directory, streamed object by object, resumed exactly, bad objects dead-lettered, a lake that
cannot be listed refused at start in one line."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from streamssl.pipeline.cli import main
from streamssl.pipeline.images import Trainer
from streamssl.streams.fashion_mnist import load_fashion_mnist
from streamssl.streams.lake import build_lake
from streamssl.streams.records import SourceError
from streamssl.streams.webdataset_source import WebDatasetSource
from tests.conftest import tiny_config
from tests.kafka_broker import MotoServer
from tests.s3_store import S3Bucket


def _lake(folder: Path, first: int, count: int, shard_size: int = 48) -> Path:
    images, labels = load_fashion_mnist("train")
    build_lake(folder, images[first:first + count], labels[first:first + count], shard_size=shard_size,
               key_prefix=f"img{first}")
    return folder


def _audited(run_dir: Path) -> list[str]:
    lines = (run_dir / "trained-keys.jsonl").read_text().splitlines()
    return [key for line in lines for key in json.loads(line)["keys"]]


def _letters(run_dir: Path) -> list[dict]:
    path = run_dir / "dead-letter.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_prefix_lists_finished_shard_objects_in_name_order_and_a_follower_sees_new_ones(
        s3: S3Bucket, tmp_path: Path) -> None:
    s3.upload(_lake(tmp_path / "lake", 0, 96), "lake/", ["shard-000001.tar"])
    s3.fs.pipe(f"{s3.bucket}/lake/.shard-000000.tar", b"hidden")  # temp names are not shards, as in a directory
    s3.fs.pipe(f"{s3.bucket}/lake/shard-000000.tar.tmp", b"partial")
    s3.fs.pipe(f"{s3.bucket}/lake/sub/shard-000009.tar", b"another prefix")
    source = WebDatasetSource(s3.url("lake/"), mode="follow", poll_seconds=0.05)
    keys: list[str] = []
    reader = threading.Thread(target=lambda: keys.extend(record.key for record in source))
    reader.start()
    try:
        deadline = time.monotonic() + 10
        while len(keys) < 48 and time.monotonic() < deadline:
            time.sleep(0.02)
        s3.upload(tmp_path / "lake", "lake/", ["shard-000000.tar"])  # lands late under an earlier name: read next
        while len(keys) < 96 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        source.close()
        reader.join(timeout=10)
    assert len(keys) == len(set(keys)) == 96
    position = source.position()
    assert position.shard == s3.url("lake/shard-000000.tar") and position.sample_index == 48


def test_a_saved_position_naming_another_bucket_or_a_command_is_refused(s3: S3Bucket, tmp_path: Path) -> None:
    s3.upload(_lake(tmp_path / "lake", 0, 48), "lake/")
    source = WebDatasetSource(s3.url("lake/"), mode="follow")
    state = {"mode": "follow", "cycle": 0, "order": [], "shard_index": 0, "sample_index": 3, "buffer": [],
             "rng": source.state_dict()["rng"], "finished": []}
    for shard in ("s3://other-bucket/lake/shard-000000.tar", "pipe:cat /etc/passwd", s3.url("lake/sub/x.tar")):
        with pytest.raises(SourceError, match="which --data s3://"):
            source.load_state_dict({**state, "shard": shard})
    source.load_state_dict({**state, "shard": s3.url("lake/shard-000000.tar")})  # its own object: resumes
    assert source.position().sample_index == 3


def test_a_prefix_cycles_with_a_fresh_listing_each_pass(s3: S3Bucket, tmp_path: Path) -> None:
    s3.upload(_lake(tmp_path / "lake", 0, 48, shard_size=24), "lake/")
    source = WebDatasetSource(s3.url("lake/"), mode="cycle", seed=3)
    records = iter(source)
    first_pass = [next(records).key for _ in range(48)]
    more = _lake(tmp_path / "more", 48, 24, shard_size=24)
    s3.fs.put_file(str(more / "shard-000000.tar"), f"{s3.bucket}/lake/shard-000002.tar")  # lands during pass 0
    second_pass = [next(records).key for _ in range(72)]
    assert sorted(first_pass) == [f"img0-{index:06d}" for index in range(48)]
    assert sorted(second_pass) == sorted(first_pass + [f"img48-{index:06d}" for index in range(24)])
    assert source.position().cycle == 1
    source.close()


def test_a_store_that_stops_answering_keeps_a_follower_waiting_not_failing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    server = MotoServer("outage", tmp_path / "moto.log")  # its own server, to stop it
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    try:
        S3Bucket(server, "outage", _filesystem(server.endpoint)).upload(_lake(tmp_path / "lake", 0, 24), "lake/")
        source = WebDatasetSource("s3://outage/lake/", mode="follow", poll_seconds=0.05, s3_endpoint=server.endpoint)
        keys: list[str] = []
        failures: list[BaseException] = []

        def read() -> None:
            try:
                keys.extend(record.key for record in source)
            except BaseException as err:  # what the test is about: nothing may escape
                failures.append(err)

        reader = threading.Thread(target=read)
        reader.start()
        deadline = time.monotonic() + 10
        while len(keys) < 24 and time.monotonic() < deadline:
            time.sleep(0.02)
        server.stop()
        while "using the previous listing" not in caplog.text and time.monotonic() < deadline + 10:
            time.sleep(0.05)
    finally:
        server.stop()
    source.close()
    reader.join(timeout=20)
    assert not reader.is_alive() and not failures and len(keys) == 24
    assert "cannot list s3://outage/lake (EndpointConnectionError); using the previous listing (1 shards)" in caplog.text


def _filesystem(endpoint: str) -> Any:
    import fsspec

    return fsspec.filesystem("s3", client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)


def test_a_run_over_a_prefix_in_once_mode_trains_every_record_dead_letters_a_corrupt_object_and_mirrors(
        s3: S3Bucket, tmp_path: Path, one_thread: None) -> None:
    s3.upload(_lake(tmp_path / "lake", 0, 128, shard_size=64), "lake/")
    s3.fs.pipe(f"{s3.bucket}/lake/shard-000000x.tar", b"not a tar archive " * 64)
    trainer = Trainer(tiny_config(tmp_path / "run", s3.url("lake/"), "data.mode=once", "data.shuffle_buffer=0",
                                  "train.audit_keys=true", "checkpoint.every_steps=0",
                                  f"publish.mirror={s3.url('encoders/')}"))
    trainer.run()
    assert s3.fs.cat_file(f"{s3.bucket}/encoders/LATEST") == b"v000001"  # the run's publish, mirrored
    trained = _audited(tmp_path / "run")
    assert sorted(trained) == [f"img0-{index:06d}" for index in range(128)]
    assert [(x["source"], x["reason"]) for x in _letters(tmp_path / "run")] == [
        (s3.url("lake/shard-000000x.tar"), "unreadable_shard")]


def test_a_followed_prefix_resumes_and_trains_every_record_exactly_once(
        s3: S3Bucket, tmp_path: Path, one_thread: None) -> None:
    s3.upload(_lake(tmp_path / "first", 0, 96), "lake/")  # shards 0, 1 of 48: 3 batches of 32
    sets = ("data.mode=auto", "data.shuffle_buffer=0", "data.poll_seconds=0.1", "train.audit_keys=true",
            "checkpoint.every_steps=1")
    first = Trainer(tiny_config(tmp_path / "run", s3.url("lake/"), *sets, "train.max_steps=2"))
    assert first.task.make_source.keywords["mode"] == "follow"  # a prefix is followed, like a directory
    first.run()  # stops inside shard 1
    assert first.state.position.shard == s3.url("lake/shard-000001.tar") and first.state.position.sample_index == 16
    later = _lake(tmp_path / "later", 96, 96)
    for name in ("shard-000000.tar", "shard-000001.tar"):  # new objects, new names, landing while the run is down
        s3.fs.put_file(str(later / name), f"{s3.bucket}/lake/{name.replace('-00000', '-00001')}")
    second = Trainer(tiny_config(tmp_path / "run", s3.url("lake/"), *sets, "train.max_steps=6"))
    second.run()
    trained = _audited(tmp_path / "run")
    expected = [f"img0-{index:06d}" for index in range(96)] + [f"img96-{index:06d}" for index in range(96)]
    assert len(trained) == 192 and sorted(trained) == sorted(expected)  # each exactly once across the two runs
    assert not _letters(tmp_path / "run")


def test_a_missing_bucket_is_one_line_and_exit_2(s3: S3Bucket, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--data", "s3://no-such-bucket/lake/", "--run-dir", str(tmp_path / "run"),
                 "--metrics-port", "0"])
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        "streamssl: error: cannot list s3://no-such-bucket/lake/ (NoSuchBucket)"]
