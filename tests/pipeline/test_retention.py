"""Retention and LATEST: published/ stays bounded, and what a consumer may be reading is never removed."""

from __future__ import annotations

import os
from pathlib import Path

from streamssl.models import load_encoder
from streamssl.models.encoder_io import Manifest
from streamssl.models.forecaster import build_trunk
from streamssl.pipeline.loop import Loop
from streamssl.pipeline.publishing import Publisher
from streamssl.pipeline.retention import prune_candidates, prune_versions, versions
from tests.pipeline.encoder_task import EncoderTask, config
from tests.pipeline.test_publishing import INPUT


def publish(publisher: Publisher, count: int) -> None:
    trunk = build_trunk("cnn", 1, 6, 8)
    for _ in range(count):
        publisher.publish(trunk, Manifest(backbone="forecaster-cnn", input=INPUT, embedding_dim=8))


def test_latest_and_its_text_file_name_the_same_complete_version(tmp_path: Path) -> None:
    publisher = Publisher(tmp_path)
    for version in (1, 2, 3):
        publish(publisher, 1)
        assert (tmp_path / "LATEST").read_text() == f"v{version:06d}\n" == os.readlink(tmp_path / "latest") + "\n"
        assert load_encoder(tmp_path / (tmp_path / "LATEST").read_text().strip()).manifest["version"] == version
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind


def test_the_newest_n_and_every_mth_are_kept_oldest_removed_first(tmp_path: Path) -> None:
    publisher = Publisher(tmp_path)
    publish(publisher, 12)
    assert prune_versions(tmp_path, keep=3, keep_every=5) == [f"v{n:06d}" for n in (1, 2, 3, 4, 6, 7, 8, 9)]
    assert versions(tmp_path) == [5, 10, 11, 12]
    assert prune_versions(tmp_path, keep=0) == []  # keep 0: everything stays
    assert prune_versions(tmp_path, keep=3, keep_every=5) == []


def test_what_latest_points_at_and_the_version_before_are_never_removed(tmp_path: Path) -> None:
    publisher = Publisher(tmp_path)
    publish(publisher, 5)
    # keep 1 still spares v000004: a consumer that resolved `latest` just before the flip may be reading it
    assert prune_versions(tmp_path, keep=1) == ["v000001", "v000002", "v000003"]
    publish(publisher, 3)
    # pinned by hand by an operator: `latest` at v000004, LATEST at v000005; both stay, whatever their age
    (tmp_path / "pin").symlink_to("v000004")
    os.replace(tmp_path / "pin", tmp_path / "latest")
    (tmp_path / "LATEST").write_text("v000005\n")
    assert prune_versions(tmp_path, keep=1) == ["v000006"]
    assert versions(tmp_path) == [4, 5, 7, 8]


def test_an_interrupted_removal_is_finished_and_never_looks_like_a_version(tmp_path: Path) -> None:
    publisher = Publisher(tmp_path)
    publish(publisher, 4)
    os.replace(tmp_path / "v000001", tmp_path / ".v000001.deleting")  # a crash between the rename and the rmtree
    assert versions(tmp_path) == [2, 3, 4] and publisher.latest_version() == 4
    assert prune_versions(tmp_path, keep=2) == ["v000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "latest", "v000003", "v000004"]


def test_candidates_keep_the_newest(tmp_path: Path) -> None:
    for step in (30, 10, 20):
        (tmp_path / f"step{step:09d}-regressed").mkdir()
    assert prune_candidates(tmp_path, 2) == ["step000000010-regressed"]
    assert prune_candidates(tmp_path / "none", 2) == []


def test_a_long_run_keeps_published_bounded(tmp_path: Path, one_thread: None) -> None:
    # 10 publishes with the gate off (no probe cost): only the last 3 remain, `latest` loads
    loop = Loop(config(tmp_path, "train.max_steps=20", "publish.keep=3", "publish.gate=false"), EncoderTask())
    loop.run()
    assert versions(tmp_path / "published") == [8, 9, 10]
    assert load_encoder(tmp_path / "published" / "latest").manifest["step"] == 20
