"""What a worker of a Ray run is given to read, checked without starting Ray: its share of an s3 prefix (a real S3
endpoint, moto), and Ray Data rows decoded exactly as the loader process decodes records.

test_distributed.py runs both through a real local Ray (slow).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from streamssl.pipeline.loading.decode import decode_or_reason, decode_record, full_resolution_side
from streamssl.pipeline.ray.feed import decode_rows
from streamssl.pipeline.ray.worker import rank_shard_spec
from streamssl.streams.records import Record, SourceError
from streamssl.streams.webdataset_source import WebDatasetSource
from tests.s3_store import S3Bucket
from tests.streams.test_s3_lake import _lake


def test_each_worker_takes_every_second_shard_object_of_an_s3_prefix_and_resumes_beside_them(
        s3: S3Bucket, tmp_path: Path) -> None:
    s3.upload(_lake(tmp_path / "lake", 0, 144), "lake/")  # shards 0-2 of 48
    s3.fs.pipe(f"{s3.bucket}/lake/shard-000003.tar.tmp", b"an upload's temp name")  # not a shard, as in a directory
    specs = [rank_shard_spec(s3.url("lake/"), "cycle", worker, 2) for worker in range(2)]
    assert specs == [f"{{{s3.url('lake/shard-000000.tar')},{s3.url('lake/shard-000002.tar')}}}",
                     s3.url("lake/shard-000001.tar")]
    keys = [sorted(record.key for record in WebDatasetSource(spec, mode="once")) for spec in specs]
    assert keys == [[f"img0-{index:06d}" for index in [*range(48), *range(96, 144)]],
                    [f"img0-{index:06d}" for index in range(48, 96)]]
    # The prefix grew while the run was down: a worker's saved shard may now be dealt to another; it is still the
    # lake's, so the worker resumes it. Another prefix's object is not.
    source = WebDatasetSource(specs[1], mode="cycle")
    state = {**source.state_dict(), "shard": s3.url("lake/shard-000002.tar"), "sample_index": 5}
    source.load_state_dict(state)
    assert source.position().shard == s3.url("lake/shard-000002.tar")
    with pytest.raises(SourceError, match="which --data"):
        source.load_state_dict({**state, "shard": s3.url("other/shard-000002.tar")})
    with pytest.raises(SourceError, match=r"^cannot list s3://no-such-bucket/lake/ \(NoSuchBucket\)$"):
        rank_shard_spec("s3://no-such-bucket/lake/", "cycle", 0, 2)


def _jpeg(width: int, height: int, mode: str = "RGB") -> bytes:
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    buffer = io.BytesIO()
    Image.fromarray((np.stack([x, y, x * y], -1) * 255).astype(np.uint8)).convert(mode).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_ray_data_rows_decode_at_full_resolution_with_the_loaders_function_and_reasons() -> None:
    side = full_resolution_side(64, 0.2)
    data = [_jpeg(600, 400), _jpeg(100, 150), _jpeg(300, 200, "CMYK"), _jpeg(90, 60, "L"), b"not a jpeg", b"",
            _jpeg(2000, 1000)]
    rows = {"key": np.array([f"k{index}" for index in range(len(data))], dtype=object),
            "source": np.array(["s"] * len(data), dtype=object), "image": np.array(data, dtype=object)}
    decoded = decode_rows(rows, image_field="jpg", channels=3, size=64, max_record_bytes=len(data[-1]) - 1,
                          full_side=side)
    records = [Record(f"k{index}", {"jpg": value} if value else {}, "s", index) for index, value in enumerate(data)]
    expected = [decode_or_reason(record, "jpg", 3, 64, len(data[-1]) - 1, side) for record in records]
    assert list(decoded["reason"]) == [reason for _, reason, _ in expected] == [
        "", "", "", "", "corrupt_image", "missing_image", "oversized_record"]
    assert decoded["detail"][6] == expected[6][2] == f"{len(data[-1])} bytes > data.max_record_bytes {len(data[-1]) - 1}"
    assert decoded["payload"][4] == b"not a jpeg" and decoded["payload"][6] == data[-1]
    for row in range(4):  # each image at its own aspect and size, as the loader process decodes it
        assert np.array_equal(decoded["image"][row], decode_record(records[row], "jpg", 3, 64, 0, side))
    assert [decoded["image"][row].shape for row in range(4)] == [(3, 118, 176), (3, 150, 100), (3, 118, 176),
                                                                  (3, 60, 90)]
