"""Every published version says where it came from: the stream range, samples and steps, the config and its
digest, the code; manifests written before lineage existed still load."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
from pathlib import Path

import torch

from streamssl.models import load_encoder
from streamssl.models.backbones import build_backbone
from streamssl.models.encoder_io import Manifest, save_encoder
from streamssl.pipeline.config import redacted
from streamssl.pipeline.lineage import config_digest, stream_position
from streamssl.pipeline.loop import Loop
from streamssl.streams.kafka_assignment import KafkaPosition
from streamssl.streams.webdataset_source import ShardPosition
from tests.pipeline.test_loop import LinearTask, after, config

REPO = Path(__file__).resolve().parents[2]


def latest_manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "published" / "latest" / "manifest.json").read_text())


def test_a_published_version_holds_its_stream_range_config_and_code(tmp_path: Path) -> None:
    loop = Loop(config(tmp_path / "run", "train.max_steps=5", "checkpoint.publish_every=0"), LinearTask())
    loop.run()
    lineage = latest_manifest(tmp_path / "run")["lineage"]

    # the stream right after the first message trained on (0) and after the last (4)
    assert lineage["first_position"] == after(0).to_dict() != lineage["last_position"] == after(4).to_dict()
    assert (lineage["samples_seen"], lineage["step"], lineage["workers"], lineage["run_dir"]) == (5, 5, 1, "run")
    assert lineage["config"] == redacted(loop.cfg) and lineage["config"]["train"]["max_steps"] == 5
    canonical = json.dumps(lineage["config"], sort_keys=True, separators=(",", ":")).encode()
    assert lineage["config_digest"] == hashlib.sha256(canonical).hexdigest()  # recomputable from the manifest
    assert lineage["torch_version"] == torch.__version__ and lineage["streamssl_version"]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    if head.returncode == 0:  # the tests run from a checkout: its commit, with or without local changes
        assert lineage["git_sha"] == head.stdout.strip() and isinstance(lineage["git_dirty"], bool)
    else:
        assert "git_sha" not in lineage


def test_a_resumed_run_keeps_its_first_position_and_a_changed_config_changes_the_digest(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = Loop(config(run_dir, "train.max_steps=4"), LinearTask())
    first.run()
    before = latest_manifest(run_dir)["lineage"]
    assert before["config_digest"] == config_digest(redacted(first.cfg))

    Loop(config(run_dir, "train.max_steps=9"), LinearTask()).run()  # resumed, one value changed
    after_resume = latest_manifest(run_dir)["lineage"]
    assert after_resume["first_position"] == before["first_position"] == after(0).to_dict()  # checkpointed
    assert (before["last_position"], after_resume["last_position"]) == (after(3).to_dict(), after(8).to_dict())
    assert after_resume["config_digest"] != before["config_digest"]
    assert after_resume["samples_seen"] == 9


def test_a_shard_position_is_shown_as_a_place_without_the_buffered_records_or_the_rng() -> None:
    buffered = tuple((f"key-{index}", {"png": b"\x89PNG" + bytes(100)}, "shard-000001.tar", index) for index in range(3))
    position = ShardPosition("cycle", 2, ("a.tar", "b.tar", "c.tar"), 1, "b.tar", 40, buffered,
                             random.Random(0).getstate())
    shown = stream_position(position)
    assert shown == {"mode": "cycle", "cycle": 2, "shard_index": 1, "shard": "b.tar", "sample_index": 40,
                     "buffered_records": 3, "pass_shards": 3}
    json.dumps(shown)  # plain JSON: no record bytes
    kafka = KafkaPosition("images", {0: 12, 3: 7})
    assert stream_position(kafka) == kafka.to_dict() and stream_position(None) == {}


def test_the_digest_is_of_the_values_not_of_their_order() -> None:
    assert config_digest({"a": 1, "b": {"c": [1, 2]}}) == config_digest({"b": {"c": [1, 2]}, "a": 1})
    assert config_digest({"a": 1}) != config_digest({"a": 2})


def test_a_manifest_from_before_lineage_and_onnx_still_loads(tmp_path: Path) -> None:
    backbone, dim = build_backbone("convnet", 1)
    save_encoder(tmp_path, backbone, Manifest(backbone="convnet", embedding_dim=dim, input={}))
    weights = json.loads((tmp_path / "manifest.json").read_text())["files"]
    old = {"version": 3, "step": 120, "samples_seen": 30720, "method": "moco", "backbone": "convnet", "feature_dim": dim,
           "input": {"channels": 1, "height": 28, "width": 28, "mean": [0.286], "std": [0.353]},
           "eval": {"knn_top1": 0.71}, "files": weights, "created_at": "2025-01-01T00:00:00Z"}
    (tmp_path / "manifest.json").write_text(json.dumps(old))

    encoder = load_encoder(tmp_path)
    assert encoder(torch.rand(2, 1, 28, 28)).shape == (2, dim)
    manifest = encoder.manifest
    assert (manifest["lineage"], manifest["onnx"], manifest["backbone_options"]) == ({}, None, {})
    assert manifest["metrics"] == {"knn_top1": 0.71} and manifest["step"] == 120
