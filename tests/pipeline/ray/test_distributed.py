"""Training on several workers: gathers into queues and banks, DDP with agreed steps, per-worker positions,
exact resume, `streamssl run --workers 2` on Ray Train (a local lake, an s3 prefix, Kafka), and a Ray Data feed
that hands the trainer what the loader process does.

Real collectives (two gloo processes), real shards, a real local Ray, a real S3 endpoint (moto).
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from streamssl.models import build_backbone
from streamssl.models.distributed import gather_from_all, rank, world_size
from streamssl.models.moco import MoCo
from streamssl.models.npid import NPID
from streamssl.models.swav import SwAV
from streamssl.pipeline import cli
from streamssl.pipeline.config import Config, ConfigError
from streamssl.pipeline.images import Trainer
from streamssl.pipeline.loading.decode import full_resolution_side
from streamssl.pipeline.loading.messages import Batch
from streamssl.pipeline.ray.feed import ray_dataset
from streamssl.pipeline.ray.worker import SharedCheckpointer, WorkerTrainer, rank_shard_spec
from tests.conftest import LAKE_IMAGES, free_port, tiny_config
from tests.pipeline.test_kafka_training import _committed, _fill, _trained
from tests.pipeline.test_rgb_lake import RGB, make_photo_folder
from tests.s3_store import S3Bucket
from tests.streams.test_ray_source import ray_cluster  # noqa: F401  (a local Ray for this module)
from tests.streams.test_s3_lake import _audited, _lake

pytestmark = pytest.mark.slow  # minutes on 2 cores: `pytest -m 'not slow'` skips it in an inner loop

BATCH = 4


@pytest.fixture(scope="module", autouse=True)
def aws_credentials() -> Iterator[None]:
    """Test credentials for the S3 endpoint, set before this module's Ray starts: its worker processes inherit the
    environment Ray was started in, not what a test sets later (the endpoint goes in data.s3_endpoint)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                            "AWS_DEFAULT_REGION": "us-east-1"}.items():
            patch.setenv(name, value)
        yield


def test_gather_is_the_identity_in_one_process() -> None:
    tensor = torch.randn(3, 5)
    assert gather_from_all(tensor) is tensor and gather_from_all(tensor, dim=1) is tensor
    assert (world_size(), rank()) == (1, 0)


def test_lake_shards_are_dealt_out_by_rank(small_lake: Path) -> None:
    specs = [rank_shard_spec(str(small_lake), "cycle", worker, 2) for worker in range(2)]
    assert specs == [f"{{{small_lake}/shard-000000.tar,{small_lake}/shard-000002.tar,{small_lake}/shard-000004.tar}}",
                     f"{{{small_lake}/shard-000001.tar,{small_lake}/shard-000003.tar}}"]
    with pytest.raises(ConfigError, match="cannot be split across workers"):
        rank_shard_spec(str(small_lake), "follow", 0, 2)
    with pytest.raises(ConfigError, match="fewer than the 6 workers"):
        rank_shard_spec(str(small_lake), "once", 5, 6)


def _methods_step(worker: int) -> dict[str, Any]:
    """One forward of MoCo, SwAV and NPID on this worker's own images; what each stored."""
    torch.manual_seed(0)  # the same initial models on both workers, as DDP starts them
    backbone, features = build_backbone("convnet", 1, bn_splits=2)
    moco = MoCo(backbone, features, queue_size=16)
    local_keys: list[torch.Tensor] = []
    encode = moco._encode_keys_with_shuffled_batch
    moco._encode_keys_with_shuffled_batch = lambda images: local_keys.append(encode(images)) or local_keys[-1]
    swav = SwAV(build_backbone("convnet", 1, bn_splits=2)[0], features, queue_size=16, queue_start_step=0,
                small_crops=0, num_prototypes=10)
    npid = NPID(build_backbone("convnet", 1, bn_splits=2)[0], features, bank_size=64, negatives=8)
    torch.manual_seed(100 + worker)  # different images per worker
    views = [torch.rand(BATCH, 1, 28, 28), torch.rand(BATCH, 1, 28, 28)]
    ids = torch.arange(BATCH) + 10 * worker
    for method, inputs in ((moco, (views,)), (swav, (views,)), (npid, (views, ids))):
        method(*inputs)
        method.commit_step()  # the trainer's call after a taken step applies the staged queue/bank writes
    return {"keys": local_keys[0], "moco_queue": moco.queue.clone(), "moco_ptr": int(moco.queue_ptr),
            "swav_queue": swav.queue.clone(), "swav_enqueued": int(swav.features_enqueued),
            "npid_ids": npid.bank_ids.clone(), "npid_bank": npid.bank.clone()}


def _train(run_dir: Path, lake: Path, steps: int) -> dict[str, Any]:
    cfg = tiny_config(run_dir, lake, f"train.max_steps={steps}", "checkpoint.every_steps=2")
    trainer = WorkerTrainer(cfg)
    state = trainer.run()
    return {"step": state.step, "samples_seen": state.samples_seen, "position": state.position,
            "summary": json.loads((run_dir / "workers" / f"rank-{trainer.worker}.json").read_text())}


def _worker(worker: int, port: int, lake: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=worker, world_size=2)
    try:
        result = {"methods": _methods_step(worker)}
        root = Path(out)
        result["straight"] = _train(root / "straight", Path(lake), 4)
        result["first_half"] = _train(root / "resumed", Path(lake), 2)
        result["second_half"] = _train(root / "resumed", Path(lake), 4)
        torch.save(result, root / f"rank-{worker}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_workers(small_lake: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """Two gloo processes: one step of the methods, then 4 DDP steps straight and 2 + 2 across a restart."""
    out = tmp_path_factory.mktemp("two-workers")
    mp.spawn(_worker, args=(free_port(), str(small_lake), str(out)), nprocs=2, join=True)
    return out, [torch.load(out / f"rank-{worker}.pt", weights_only=False) for worker in range(2)]


def test_queues_and_banks_take_every_workers_batch(two_workers: tuple[Path, list[dict[str, Any]]]) -> None:
    first, second = (result["methods"] for result in two_workers[1])
    for name in ("moco_queue", "swav_queue", "npid_ids", "npid_bank"):
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)
    torch.testing.assert_close(first["moco_queue"][: 2 * BATCH], torch.cat([first["keys"], second["keys"]]))
    assert first["moco_ptr"] == 2 * BATCH and first["swav_enqueued"] == 2 * BATCH
    assert sorted(first["npid_ids"][first["npid_ids"] >= 0].tolist()) == [0, 1, 2, 3, 10, 11, 12, 13]


def test_ddp_workers_stay_identical_and_resume_exactly(two_workers: tuple[Path, list[dict[str, Any]]]) -> None:
    out, results = two_workers
    for name in ("straight", "second_half"):
        summaries = [result[name]["summary"] for result in results]
        assert [summary["step"] for summary in summaries] == [4, 4]
        assert summaries[0]["parameters_sha256"] == summaries[1]["parameters_sha256"]
        assert results[0][name]["samples_seen"] == 4 * 2 * 32  # the global count: both workers' batches
    # Each worker read its own shards, and its own position went into the checkpoint.
    checkpoint = torch.load(out / "resumed" / "checkpoints" / "ckpt-000000004.pt", weights_only=True)
    positions = [entry["position"] for entry in checkpoint["ranks"]]
    assert checkpoint["world_size"] == 2 and positions[0]["shard"] != positions[1]["shard"]
    assert [results[worker]["second_half"]["position"].shard for worker in range(2)] == [p["shard"] for p in positions]
    # 2 + 2 steps across a restart train exactly as 4 straight: same samples, same views, same state.
    straight = torch.load(out / "straight" / "checkpoints" / "ckpt-000000004.pt", weights_only=True)
    for name, tensor in straight["method"].items():
        torch.testing.assert_close(checkpoint["method"][name], tensor, rtol=0, atol=0, msg=name)
    assert [entry["position"]["sample_index"] for entry in checkpoint["ranks"]] == \
        [entry["position"]["sample_index"] for entry in straight["ranks"]]


@pytest.mark.usefixtures("ray_cluster")
def test_cli_runs_two_ray_train_workers_and_resumes(small_lake: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")  # notices the end of training ~2 s sooner
    run_dir = tmp_path / "run"
    common = ["run", "--workers", "2", "--data", f"ray+webdataset://{small_lake}", "--run-dir", str(run_dir),
              "--metrics-port", "0", "--set", "eval.dataset=none", "--set", "train.batch_size=32",
              "--set", "model.bn_splits=4", "--set", "moco.queue_size=128", "--set", "checkpoint.every_steps=2",
              "--set", "checkpoint.every_seconds=0", "--set", "train.audit_keys=true", "--set", "data.mode=cycle"]
    assert cli.main([*common, "--max-steps", "3"]) == 0
    assert cli.main([*common, "--max-steps", "5"]) == 0

    summaries = [json.loads((run_dir / "workers" / f"rank-{worker}.json").read_text()) for worker in range(2)]
    assert [summary["step"] for summary in summaries] == [5, 5]
    assert summaries[0]["parameters_sha256"] == summaries[1]["parameters_sha256"]
    checkpoint = torch.load(run_dir / "checkpoints" / "ckpt-000000005.pt", weights_only=True)
    assert [entry["position"] for entry in checkpoint["ranks"]] == [{"kind": "ray", "pass": 0, "rows": 5 * 32}] * 2
    assert checkpoint["samples_seen"] == 5 * 2 * 32
    # Every trained record is new: the rerun went on after each worker's own position, nothing was replayed
    # (5 steps x 32 rows stay inside each worker's first pass of 320 rows).
    keys = [key for line in (run_dir / "trained-keys.jsonl").read_text().splitlines() for key in json.loads(line)["keys"]]
    assert len(keys) == len(set(keys)) == 5 * 2 * 32 < LAKE_IMAGES
    assert sorted(path.name for path in (run_dir / "ray" / "streamssl").glob("ckpt-*")) == \
        ["ckpt-000000002-1", "ckpt-000000003-2", "ckpt-000000004-3", "ckpt-000000005-4"][-3:]


def test_each_worker_resumes_its_own_part_of_a_checkpoint(tmp_path: Path) -> None:
    kafka = [{"kind": "kafka", "topic": "t", "offsets": {"0": 7, "1": 3}}, {"kind": "kafka", "topic": "t",
                                                                            "offsets": {"1": 9, "2": 4}}]
    ckpt = {"step": 4, "source": kafka[0], "rng": "rng-0",
            "ranks": [{"position": kafka[0], "rng": "rng-0"}, {"position": kafka[1], "rng": "rng-1"}]}
    view = SharedCheckpointer(tmp_path, 3, worker=1, workers=2, ray_session=False).rank_view(ckpt)
    # Kafka partitions move between workers: each gets the newest offset of every partition.
    assert view["source"] == {"kind": "kafka", "topic": "t", "offsets": {"0": 7, "1": 9, "2": 4}}
    assert view["rng"] == "rng-1" and view["step"] == 4
    shards = [{"kind": "ray", "pass": 0, "rows": 64}, {"kind": "ray", "pass": 1, "rows": 8}]
    ckpt["ranks"] = [{"position": shards[0], "rng": "rng-0"}, {"position": shards[1], "rng": "rng-1"}]
    assert SharedCheckpointer(tmp_path, 3, 1, 2, False).rank_view(ckpt)["source"] == shards[1]
    with pytest.raises(ConfigError, match="written by 2 worker"):
        SharedCheckpointer(tmp_path, 3, 0, 3, False).rank_view(ckpt)
    single = {"step": 4, "source": shards[0], "rng": "rng-0"}  # a single-process run's checkpoint
    assert SharedCheckpointer(tmp_path, 3, 0, 1, False).rank_view(single)["source"] == shards[0]
    with pytest.raises(ConfigError, match="written by 1 worker"):
        SharedCheckpointer(tmp_path, 3, 0, 2, False).rank_view(single)


def test_cli_two_ray_workers_share_one_kafka_group_by_partition(kafka_broker: Any, small_lake: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    topic, group, batch, every = "ray-workers", "ray-workers-g", 32, 2
    _fill(kafka_broker, topic, small_lake, count=LAKE_IMAGES)
    run_dir = tmp_path / "run"
    common = ["run", "--workers", "2", "--data", f"{kafka_broker.url(topic)}?group={group}", "--run-dir", str(run_dir),
              "--metrics-port", "0", "--set", "eval.dataset=none", "--set", f"train.batch_size={batch}",
              "--set", "model.bn_splits=4", "--set", "moco.queue_size=128", "--set", f"checkpoint.every_steps={every}",
              "--set", "checkpoint.every_seconds=0", "--set", "train.audit_keys=true",
              "--set", "kafka.session_timeout_ms=6000"]
    assert cli.main([*common, "--max-steps", "3"]) == 0
    first = torch.load(run_dir / "checkpoints" / "ckpt-000000003.pt", weights_only=True)
    # each worker read only its own partitions, p % 2 == rank
    read = [{int(partition) for partition in entry["position"]["offsets"]} for entry in first["ranks"]]
    assert read[0] and read[1] and read[0] <= {0, 2} and read[1] <= {1, 3}
    assert cli.main([*common, "--max-steps", "5"]) == 0

    checkpoint = torch.load(run_dir / "checkpoints" / "ckpt-000000005.pt", weights_only=True)
    positions = [entry["position"] for entry in checkpoint["ranks"]]
    assert [position["kind"] for position in positions] == ["kafka", "kafka"]
    # what the group committed is where the last checkpoint's workers stood, partition by partition
    merged: dict[str, int] = {}
    for position in positions:
        for partition, offset in position["offsets"].items():
            merged[partition] = max(merged.get(partition, 0), offset)
    assert _committed(kafka_broker, topic, group) == sum(merged.values())
    # no partition changes hands within the job, so a clean stop and resume trains no record twice
    trained = _trained(run_dir)
    assert sum(trained.values()) == len(trained) == 5 * 2 * batch


@pytest.mark.usefixtures("ray_cluster")
def test_cli_two_ray_workers_split_an_s3_prefix_by_shard_and_resume(s3: S3Bucket, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    s3.upload(_lake(tmp_path / "lake", 0, 192), "lake/")  # 4 shards of 48: 96 records, 3 batches, per worker
    run_dir = tmp_path / "run"
    common = ["run", "--workers", "2", "--data", s3.url("lake/"), "--run-dir", str(run_dir), "--metrics-port", "0",
              "--set", f"data.s3_endpoint={s3.server.endpoint}", "--set", "data.mode=cycle", "--set", "eval.dataset=none",
              "--set", "data.shuffle_buffer=0",  # a buffer larger than a pass mixes the next pass's records in
              "--set", "train.batch_size=32", "--set", "model.bn_splits=4", "--set", "moco.queue_size=128",
              "--set", "checkpoint.every_steps=3", "--set", "checkpoint.every_seconds=0", "--set", "train.audit_keys=true"]
    assert cli.main([*common, "--max-steps", "3"]) == 0
    # One pass of each worker's own shards: every record of the prefix trained once, none twice.
    assert sorted(_audited(run_dir)) == [f"img0-{index:06d}" for index in range(192)]
    first = torch.load(run_dir / "checkpoints" / "ckpt-000000003.pt", weights_only=True)
    orders = [set(entry["position"]["order"]) for entry in first["ranks"]]
    assert orders[0] | orders[1] == {s3.url(f"lake/shard-{index:06d}.tar") for index in range(4)}
    assert not orders[0] & orders[1] and len(orders[0]) == len(orders[1]) == 2  # no shard read by both workers

    assert cli.main([*common, "--max-steps", "5"]) == 0
    # The rerun went on from each worker's own position: the first two batches of its second pass.
    second = torch.load(run_dir / "checkpoints" / "ckpt-000000005.pt", weights_only=True)
    positions = [entry["position"] for entry in second["ranks"]]
    assert [position["cycle"] for position in positions] == [1, 1]
    assert [set(position["order"]) for position in positions] == orders
    resumed = _audited(run_dir)[192:]
    assert len(resumed) == len(set(resumed)) == 2 * 2 * 32


def test_an_s3_prefix_is_followed_by_one_process_only(s3: S3Bucket, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    s3.upload(_lake(tmp_path / "lake", 0, 96), "lake/")
    code = cli.main(["run", "--workers", "2", "--data", s3.url("lake/"), "--run-dir", str(tmp_path / "run"),
                     "--metrics-port", "0"])  # data.mode auto: a prefix is followed
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        "streamssl: error: data.mode follow (the default for a lake directory or an s3 prefix) cannot be split across "
        "workers; use --set data.mode=cycle or once, a ray+webdataset:// spec, or a Kafka topic"]


def _record_batches(trainer: Trainer) -> list[Batch]:
    """The batches a trainer's step is given: what reaches the augmentation."""
    batches: list[Batch] = []
    step = trainer.task.step

    def recording_step(batch: Batch) -> Any:
        batches.append(batch)
        return step(batch)

    trainer.task.step = recording_step
    return batches


def _rgb_config(run_dir: Path, lake: Path, source: str) -> Config:
    return tiny_config(run_dir, lake, *RGB, f"data.source={source}", "data.mode=once", "data.shuffle_buffer=0",
                       "checkpoint.every_steps=0")


@pytest.fixture(scope="module")
def rgb_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test_rgb_lake.py's mixed-size RGB JPEGs (100-600 px), written as a lake by `streamssl lake --from`."""
    lake = tmp_path_factory.mktemp("rgb-lake")
    assert cli.main(["lake", "--from", str(make_photo_folder(tmp_path_factory.mktemp("photos"))), "--out", str(lake),
                     "--shard-size", "10"]) == 0
    return lake


@pytest.mark.usefixtures("ray_cluster")
def test_the_ray_data_feed_hands_the_trainer_full_resolution_batches_as_the_loader_process_does(
        tmp_path: Path, rgb_lake: Path, one_thread: None) -> None:
    lake = rgb_lake
    local = Trainer(_rgb_config(tmp_path / "local", lake, str(lake)))
    local_batches = _record_batches(local)
    local.run()
    cfg = _rgb_config(tmp_path / "ray", lake, f"ray+webdataset://{lake}")
    on_ray = WorkerTrainer(cfg, data_iterator=ray_dataset(cfg).iterator())  # what `run_distributed` runs
    ray_batches = _record_batches(on_ray)
    on_ray.run()

    assert [batch.keys for batch in ray_batches] == [batch.keys for batch in local_batches] and len(ray_batches) == 3
    for ours, theirs in zip(ray_batches, local_batches, strict=True):
        assert ours.extents is not None and theirs.extents is not None
        assert torch.equal(ours.images, theirs.images) and torch.equal(ours.extents, theirs.extents)
    assert on_ray.state.samples_seen == local.state.samples_seen == 24
    expected, actual = local.method.state_dict(), on_ray.method.state_dict()
    assert [name for name in expected if not torch.equal(expected[name], actual[name])] == []

    # Nothing squashed: each extent is the photo's own size, or (past the side a crop needs) its aspect shrunk.
    side = full_resolution_side(64, 0.2)
    sizes = {}
    for shard in lake.glob("*.tar"):
        with tarfile.open(shard) as tar:
            for member in tar:
                handle = tar.extractfile(member)
                if member.name.endswith(".jpg") and handle is not None:
                    sizes[member.name.removesuffix(".jpg")] = Image.open(io.BytesIO(handle.read())).size
    for batch in ray_batches:
        for key, (height, width) in zip(batch.keys, batch.extents.tolist(), strict=True):
            photo_width, photo_height = sizes[key]
            if photo_width * photo_height <= side * side:
                assert (height, width) == (photo_height, photo_width)
            else:
                assert height * width <= (side + 1) ** 2 and math.isclose(width / height, photo_width / photo_height,
                                                                         rel_tol=0.02)
