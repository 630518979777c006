"""`publish.mirror=s3://…` against a real S3 endpoint (a local moto server, tests/s3_store.py): each version's files,
then `LATEST`; a consumer fetches and loads what `LATEST` names; a mirror that fails is counted, never stops the
run, and is caught up at the next publish."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry, Counter

from streamssl.models import load_encoder
from streamssl.models.encoder_folder import EncoderLoadError
from streamssl.models.encoder_io import Manifest
from streamssl.models.forecaster import build_trunk
from streamssl.models.mirror_fetch import fetch_latest
from streamssl.pipeline.config import ConfigError
from streamssl.pipeline.images import Trainer
from streamssl.pipeline.mirror import check_mirror, mirror_published
from streamssl.pipeline.publishing import Publisher
from streamssl.pipeline.sections import PublishConfig
from streamssl.streams.fashion_mnist import load_fashion_mnist
from streamssl.streams.lake import build_lake
from tests.conftest import tiny_config
from tests.s3_store import S3Bucket

INPUT = {"channels": 1, "lag": 6, "window": 32, "mean": [0.0], "std": [1.0]}


def _publish(publisher: Publisher, step: int) -> Path:
    trunk = build_trunk("cnn", 1, 6, 8)
    return publisher.publish(trunk, Manifest(backbone="forecaster-cnn", input=INPUT, embedding_dim=8, step=step))[1]


def _failures() -> Counter:
    return Counter("mirror_failures", "test", registry=CollectorRegistry())


def test_each_version_is_uploaded_before_latest_and_a_consumer_loads_the_latest(s3: S3Bucket, tmp_path: Path) -> None:
    publisher, failures = Publisher(tmp_path / "published"), _failures()
    cfg = PublishConfig(mirror=s3.url("encoders/"))
    first = _publish(publisher, 5)
    mirror_published(cfg, publisher.directory, failures)
    assert s3.fs.cat_file(f"{s3.bucket}/encoders/LATEST") == b"v000001"
    assert s3.names("encoders/v000001/") == sorted(path.name for path in first.iterdir())
    second = _publish(publisher, 10)
    mirror_published(cfg, publisher.directory, failures)
    # LATEST is written after every file of the version it names: what an object store offers instead of a rename.
    uploaded = {entry["name"].rsplit("/", 1)[-1]: entry["LastModified"]
                for entry in s3.fs.ls(f"{s3.bucket}/encoders/v000002", detail=True, refresh=True)}
    latest = s3.fs.info(f"{s3.bucket}/encoders/LATEST", refresh=True)["LastModified"]
    assert sorted(uploaded) == sorted(path.name for path in second.iterdir())
    assert all(when <= latest for when in uploaded.values()) and s3.fs.cat_file(f"{s3.bucket}/encoders/LATEST") == b"v000002"
    assert failures._value.get() == 0

    encoder = fetch_latest(s3.url("encoders/"), tmp_path / "cache")
    assert encoder.manifest["version"] == 2 and (tmp_path / "cache" / "v000002").is_dir()
    series = torch.randn(3, 1, 6)
    assert torch.equal(encoder(series), load_encoder(second)(series))  # the same weights, verified the same way
    s3.fs.pipe(f"{s3.bucket}/encoders/LATEST", b"../../etc")  # the mirror is untrusted input too
    with pytest.raises(EncoderLoadError, match="not a version folder"):
        fetch_latest(s3.url("encoders/"), tmp_path / "cache")


def test_a_failing_mirror_is_counted_and_caught_up_at_the_next_publish(s3: S3Bucket, tmp_path: Path) -> None:
    publisher, failures = Publisher(tmp_path / "published"), _failures()
    cfg = PublishConfig(mirror=f"s3://{s3.bucket}-later/encoders/")
    _publish(publisher, 5)
    mirror_published(cfg, publisher.directory, failures)  # no such bucket yet: logged and counted, nothing raised
    assert failures._value.get() == 1
    s3.fs.mkdir(f"{s3.bucket}-later")
    _publish(publisher, 10)
    mirror_published(cfg, publisher.directory, failures)  # uploads both versions the mirror lacks, then LATEST
    assert failures._value.get() == 1
    found = s3.fs.find(f"{s3.bucket}-later/encoders/", refresh=True)
    assert {path.split("/")[2] for path in found} == {"v000001", "v000002", "LATEST"}
    assert s3.fs.cat_file(f"{s3.bucket}-later/encoders/LATEST") == b"v000002"


def test_a_run_with_an_unreachable_mirror_publishes_locally_and_counts_each_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    images, labels = load_fashion_mnist("train")
    build_lake(tmp_path / "lake", images[:96], labels[:96], shard_size=48)
    # A stopped server: nothing listens on port 9 (discard), so each upload fails at connect, as after a crash.
    trainer = Trainer(tiny_config(tmp_path / "run", tmp_path / "lake", "train.max_steps=4",
                                  "publish.mirror=s3://encoders/run/", "publish.mirror_endpoint=http://127.0.0.1:9"))
    trainer.run()
    assert (tmp_path / "run" / "published" / "latest" / "manifest.json").is_file()
    assert trainer.metrics.publish_mirror_failures._value.get() >= 2  # every publish tried, none stopped the run
    assert trainer.state.step == 4


def test_a_mirror_that_is_not_s3_is_refused_at_start() -> None:
    with pytest.raises(ConfigError, match=r"publish\.mirror must be an s3://bucket/prefix/ URL"):
        check_mirror(PublishConfig(mirror="/mnt/encoders"))
