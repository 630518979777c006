"""Ray Data sources: spec parsing, every record read once, exact resume by row count, rejects, split shards.

Real Ray (a local instance shared by the session), real shards, Parquet and PNG files.
"""

from __future__ import annotations

import contextlib
import io
import json
import queue
import sys
import tarfile
import threading
import time
import traceback
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from streamssl.pipeline.config import load_config
from streamssl.pipeline.images import Trainer
from streamssl.pipeline.loading.messages import Batch, Reject
from streamssl.pipeline.ray.cluster import start_ray, stop_ray
from streamssl.pipeline.ray.feed import RayDataFeed, decode_rows
from streamssl.streams.fashion_mnist import load_fashion_mnist
from streamssl.streams.lake import png_bytes
from streamssl.streams.ray_source import RayPosition, RayShardReader, parse_ray_spec, read_ray_dataset
from streamssl.streams.records import SourceError
from tests.conftest import LAKE_IMAGES, read_to_end, tiny_config

pytestmark = pytest.mark.slow  # minutes on 2 cores: `pytest -m 'not slow'` skips it in an inner loop


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A local Ray for a module's tests (ray.init takes seconds); 2 worker slots for the CLI test.

    Not for the whole session: other modules fork loader processes from this one, and a fork while Ray's
    gRPC threads run can leave `ray.shutdown()` waiting forever on its log subscriber (seen here).
    """
    temp_dir = start_ray(workers=2)
    yield
    stop_ray(temp_dir)


def dataset(spec: str) -> object:
    return read_ray_dataset(spec, partial(decode_rows, image_field="png", channels=1, size=28))


def reader(spec: str, position: RayPosition | None = None, rejects: list | None = None, **options: object
           ) -> RayShardReader:
    options = {"batch_size": 32, "mode": "once", **options}
    shard = RayShardReader(dataset(spec).iterator(), on_reject=lambda *reject: rejects.append(reject)
                           if rejects is not None else None, **options)
    shard.load_state_dict(position.to_dict() if position else {})
    return shard


def take(shard: RayShardReader, count: int) -> list:
    batches = iter(shard)
    taken = [next(batches) for _ in range(count)]
    batches.close()  # ends Ray's prefetching now
    return taken


def index_of(key: str) -> int:
    return int(key.rsplit("-", 1)[1])


def test_ray_specs_are_parsed_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lake").mkdir()
    assert parse_ray_spec("ray+webdataset://lake") == ("webdataset", str(tmp_path / "lake"))
    assert parse_ray_spec("ray+parquet://s3://bucket/table") == ("parquet", "s3://bucket/table")
    for bad in ("ray+csv:///x", "ray+images:/x", "webdataset:///x", "ray+parquet://"):
        with pytest.raises(SourceError, match="not a Ray Data spec"):
            parse_ray_spec(bad)
    with pytest.raises(SourceError, match="data path not found"):
        parse_ray_spec("ray+webdataset:///no/such/lake")
    with pytest.raises(SourceError, match="not available for Ray Data"):
        RayShardReader(None, batch_size=8, mode="follow")


def test_webdataset_every_record_once_and_resume_is_exact(ray_cluster: None, small_lake: Path) -> None:
    spec = f"ray+webdataset://{small_lake}"
    full = list(reader(spec, shuffle_buffer=64))
    keys = [key for _, batch_keys, _, _ in full for key in batch_keys]
    assert len(full) == LAKE_IMAGES // 32 and len(keys) == len(set(keys)) == LAKE_IMAGES
    assert keys != sorted(keys)  # the seeded local shuffle did shuffle
    images, _ = load_fashion_mnist("train")
    first_images, first_keys, first_ids, position = full[0]
    first_images = np.stack(first_images)  # a batch is a list of [C, H, W] arrays (full resolution: of any sides)
    assert first_images.dtype == np.uint8 and first_images.shape == (32, 1, 28, 28)
    np.testing.assert_array_equal(first_images[:, 0], images[[index_of(key) for key in first_keys]])
    assert len(set(first_ids.tolist())) == 32 and position == RayPosition(0, 32)

    # A new reader given the position after batch 6 continues exactly as the uninterrupted one did.
    rest = list(reader(spec, full[6][3], shuffle_buffer=64))
    assert [batch[1] for batch in rest] == [batch[1] for batch in full[7:]]
    np.testing.assert_array_equal(np.stack(rest[-1][0]), np.stack(full[-1][0]))


def test_webdataset_member_names_that_are_not_utf8_are_read_with_their_bytes_spelled_out(
        ray_cluster: None, tmp_path: Path) -> None:
    images, _ = load_fashion_mnist("train")
    # Raw Latin-1 bytes, no pax header: Ray's tar reader decodes them with surrogateescape, as tarfile does.
    with tarfile.open(tmp_path / "shard-000000.tar", "w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as archive:
        for index in range(32):
            data = png_bytes(images[index])
            info = tarfile.TarInfo(f"caf\udce9-{index:03d}.png")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    rejects: list = []
    (batch_images, keys, ids, _), = list(reader(f"ray+webdataset://{tmp_path}", rejects=rejects))
    assert keys == [f"caf\\xe9-{index:03d}" for index in range(32)] and rejects == []
    assert len(set(ids.tolist())) == 32
    np.testing.assert_array_equal(np.stack(batch_images)[:, 0], images[:32])


def test_cycle_batches_span_passes_with_a_new_order_each_pass(ray_cluster: None, small_lake: Path) -> None:
    spec = f"ray+webdataset://{small_lake}"
    per_pass = LAKE_IMAGES // 48  # 13 whole batches, then one that spans into the second pass
    batches = take(reader(spec, mode="cycle", batch_size=48, shuffle_buffer=64), per_pass + 3)
    spanning = batches[per_pass]
    assert spanning[3] == RayPosition(1, 48 - LAKE_IMAGES % 48)
    first_pass = [key for batch in batches[:per_pass] for key in batch[1]] + spanning[1][: LAKE_IMAGES % 48]
    second_pass = spanning[1][LAKE_IMAGES % 48:] + [key for batch in batches[per_pass + 1:] for key in batch[1]]
    assert sorted(first_pass) == sorted({*first_pass}) and len(first_pass) == LAKE_IMAGES
    assert second_pass != first_pass[: len(second_pass)]  # each pass is shuffled with its own seed

    resumed = take(reader(spec, batches[per_pass - 1][3], mode="cycle", batch_size=48, shuffle_buffer=64), 3)
    assert [batch[1] for batch in resumed] == [batch[1] for batch in batches[per_pass:]]


def test_parquet_rows_with_bad_images_are_rejected_and_the_rest_read(ray_cluster: None, tmp_path: Path) -> None:
    images, _ = load_fashion_mnist("train")
    data = [png_bytes(image) for image in images[:70]]
    data[5], data[40] = b"not a png", b""
    table = pa.table({"key": [f"row-{index}" for index in range(70)], "png": data, "label": list(range(70))})
    pq.write_table(table.slice(0, 35), tmp_path / "part-0.parquet")
    pq.write_table(table.slice(35), tmp_path / "part-1.parquet")
    rejects: list = []
    batches = list(reader(f"ray+parquet://{tmp_path}", rejects=rejects, batch_size=17))
    keys = [key for batch in batches for key in batch[1]]
    assert len(batches) == 4 and keys == [f"row-{index}" for index in range(70) if index not in (5, 40)][:68]
    assert {(reject[1], reject[2]) for reject in rejects} == {("row-5", "corrupt_image"), ("row-40", "missing_image")}
    assert rejects[0][4] == b"not a png" and rejects[0][0].endswith("part-0.parquet")
    good = [index for index in range(70) if index not in (5, 40)]
    np.testing.assert_array_equal(np.stack([image for batch in batches for image in batch[0]])[:, 0], images[good[:68]])
    assert batches[2][3] == RayPosition(0, 53)  # 51 good rows and the 2 rejected ones


def test_the_feed_hands_rejects_to_the_loop_with_positions_that_skip_no_row(ray_cluster: None, tmp_path: Path,
                                                                            small_lake: Path) -> None:
    images, _ = load_fashion_mnist("train")
    data = [png_bytes(image) for image in images[:40]]
    data[0], data[20], data[21] = b"not a png", b"", b"not a png either"
    table = pa.table({"key": [f"row-{index}" for index in range(40)], "png": data})
    pq.write_table(table, tmp_path / "part-0.parquet")
    cfg = load_config(sets=[f"data.source=ray+parquet://{tmp_path}", "data.mode=once", "data.shuffle_buffer=0",
                            "train.batch_size=8", "model.bn_splits=4"])

    def messages(position: RayPosition | None) -> list:
        return read_to_end(RayDataFeed(dataset(cfg.data.source).iterator(), position, cfg), 60)

    taken = messages(None)
    rejects = [message for message in taken if isinstance(message, Reject)]
    assert [(reject.key, reject.reason) for reject in rejects] == [
        ("row-0", "corrupt_image"), ("row-20", "missing_image"), ("row-21", "corrupt_image")]
    # Nothing waits before row-0: its reject is past it. Rows 9-19 wait for batches when rows 20 and 21 come:
    # theirs is the position of the last batch handed out (rows 1-8).
    assert [reject.position for reject in rejects] == [RayPosition(0, 1), RayPosition(0, 9), RayPosition(0, 9)]
    batches = [message for message in taken if isinstance(message, Batch)]
    assert [type(message) for message in taken[:5]] == [Reject, Batch, Reject, Reject, Batch]
    assert batches[1].keys == [f"row-{index}" for index in range(9, 17)]
    # Resumed from the last reject's position, the feed goes on with exactly the batch that came next.
    assert next(m for m in messages(rejects[-1].position) if isinstance(m, Batch)).keys == batches[1].keys
    trainer = Trainer(tiny_config(tmp_path / "run", small_lake))  # the loop of any image run
    for reject in rejects:
        assert trainer.receive(reject) == "" and trainer.state.position is reject.position
    assert trainer.dead_letters.counts == {"corrupt_image": 2, "missing_image": 1}
    letters = [json.loads(line) for line in (tmp_path / "run" / "dead-letter.jsonl").read_text().splitlines()]
    assert [letter["key"] for letter in letters] == ["row-0", "row-20", "row-21"]


def test_image_folder_is_decoded_by_ray_data(ray_cluster: None, tmp_path: Path) -> None:
    images, _ = load_fashion_mnist("train")
    for index in range(8):
        (tmp_path / f"img-{index}.png").write_bytes(png_bytes(images[index]))
    batches = list(reader(f"ray+images://{tmp_path}", batch_size=4))
    keys = [key for batch in batches for key in batch[1]]
    assert sorted(keys) == sorted(str(tmp_path / f"img-{index}.png") for index in range(8))
    for pixels, batch_keys, _, _ in batches:
        order = [int(Path(key).stem.split("-")[1]) for key in batch_keys]
        np.testing.assert_array_equal(np.stack(pixels)[:, 0], images[order])


# Closing a split shard mid-pass can leave Ray Data's own prefetch thread waiting on the split coordinator
# until ray.shutdown ends it (with SystemExit) when this module's Ray goes: benign, and Ray's, not ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_split_shards_are_disjoint_and_a_worker_behind_drains_to_the_pass_barrier(
        ray_cluster: None, small_lake: Path) -> None:
    """Two workers' `streaming_split` shards: together every record once; and when one worker waits for the
    next pass (a barrier across shards) while the other sits behind a full prefetch queue, `drain` frees it."""
    cfg = load_config(sets=[f"data.source=ray+webdataset://{small_lake}", "data.mode=cycle", "data.shuffle_buffer=0",
                            "train.batch_size=32", "data.prefetch_batches=1", "model.bn_splits=4"])
    splits = dataset(cfg.data.source).streaming_split(2, equal=True)
    feeds = [RayDataFeed(split, None, cfg) for split in splits]
    per_pass = LAKE_IMAGES // 2 // 32
    ahead: list = []
    drained = threading.Event()
    try:
        while len(ahead) < per_pass + 2:  # worker 0 reads into its second pass; worker 1 reads nothing yet
            try:
                ahead.append(feeds[0].next(timeout=0.5))
            except queue.Empty:
                if feeds[0].waiting_for_pass:
                    feeds[1].drain()
                    drained.set()
        behind = [feeds[1].next(timeout=30) for _ in range(per_pass)]
    finally:
        for feed in feeds:
            feed.close()
    assert drained.is_set()
    assert ahead[per_pass].position == RayPosition(1, 32)
    first_pass = [key for batch in ahead[:per_pass] + behind for key in batch.keys]
    assert len(first_pass) == len(set(first_pass)) == LAKE_IMAGES
    assert ahead[per_pass].keys == ahead[0].keys  # no shuffle: every pass repeats the shard's order


def _threads_inside_split_reads() -> list[str]:
    """Threads of this process whose stack is inside Ray Data's streaming_split iterator."""
    frames = sys._current_frames()
    return [thread.name for thread in threading.enumerate() if thread.ident in frames and
            any("stream_split_iterator" in entry.filename for entry in traceback.extract_stack(frames[thread.ident]))]


def test_a_split_closed_while_waiting_at_its_pass_barrier_leaves_no_thread_inside_ray(
        ray_cluster: None, small_lake: Path) -> None:
    """Worker 0 has read its whole pass and waits for worker 1 to start the next one, which never happens: the
    run ends there. close() must still end every thread waiting in Ray, since ray.shutdown() with a thread
    inside Ray ends the whole process with exit code 1 (it did in CI, after this module)."""
    cfg = load_config(sets=[f"data.source=ray+webdataset://{small_lake}", "data.mode=cycle", "data.shuffle_buffer=0",
                            "train.batch_size=32", "data.prefetch_batches=1", "model.bn_splits=4"])
    splits = dataset(cfg.data.source).streaming_split(2, equal=True)
    feeds = [RayDataFeed(split, None, cfg) for split in splits]
    read, deadline = 0, time.monotonic() + 120
    while not feeds[0].waiting_for_pass:
        assert time.monotonic() < deadline, "worker 0 never reached the end of its pass"
        with contextlib.suppress(queue.Empty):
            read += isinstance(feeds[0].next(timeout=0.5), Batch)
    time.sleep(1.0)  # well inside Ray's wait for the next pass by now
    assert read == LAKE_IMAGES // 2 // 32 and _threads_inside_split_reads()
    for feed in feeds:
        feed.close()
    deadline = time.monotonic() + 10
    while _threads_inside_split_reads():
        assert time.monotonic() < deadline, f"still inside Ray: {_threads_inside_split_reads()}"
        time.sleep(0.1)
    assert not any(feed._thread.is_alive() for feed in feeds)


def test_a_symlink_loop_in_a_ray_webdataset_lake_is_dead_lettered_like_in_the_shard_path(
        ray_cluster: None, tmp_path: Path, small_lake: Path) -> None:
    lake = tmp_path / "lake"
    lake.mkdir()
    for shard in sorted(small_lake.glob("*.tar"))[:2]:
        (lake / shard.name).write_bytes(shard.read_bytes())
    (lake / "shard-000001x.tar").symlink_to("shard-000001x.tar")  # points at itself, as in test_lake_faults.py
    cfg = load_config(sets=[f"data.source=ray+webdataset://{lake}", "data.mode=once", "data.shuffle_buffer=0",
                            "train.batch_size=32", "model.bn_splits=4"])

    def messages(position: RayPosition | None, report: bool = True) -> list:
        return read_to_end(RayDataFeed(dataset(cfg.data.source).iterator(), position, cfg, report_unlisted=report), 60)

    taken = messages(None)
    rejects = [message for message in taken if isinstance(message, Reject)]
    assert [(Path(r.source).name, r.key, r.reason, r.detail, r.position) for r in rejects] == [
        ("shard-000001x.tar", "", "unreadable_shard", "Too many levels of symbolic links", RayPosition(0, 0))]
    assert sum(len(message.keys) for message in taken if isinstance(message, Batch)) == 256  # the rest trains
    assert not [m for m in messages(RayPosition(0, 64)) if isinstance(m, Reject)]  # mid-pass: reported already
    assert not [m for m in messages(None, report=False) if isinstance(m, Reject)]  # other ranks: rank 0 reports
