"""A seeded decode fuzz through the real loader process: every mutated image is trained or rejected with a reason,
each exactly once, and the stream always reaches its end (bench/decode_fuzz.py runs the long version)."""

from __future__ import annotations

import io
import itertools
import struct
import zlib
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from streamssl.pipeline.loading.loader import BatchLoader
from streamssl.pipeline.loading.messages import Batch, End, Reject
from streamssl.streams.lake import write_shard
from streamssl.streams.webdataset_source import WebDatasetSource
from tests.conftest import drain
from tests.fuzzing import mutated_images

BATCH = 16



def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares a huge image: refused before anything that size is allocated."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + header
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + b"\x00\x00\x00\x00IEND\xaeB`\x82")


def test_mutated_images_are_each_trained_or_rejected_once_and_the_stream_ends(tmp_path: Path) -> None:
    fuzz = [(f"fuzz-{i:04d}", {"png": data}) for i, data in enumerate(itertools.islice(mutated_images(seed=7), 600))]
    good = []
    for i in range(64):
        buffer = io.BytesIO()
        Image.fromarray(np.full((28, 28), i * 3, dtype=np.uint8)).save(buffer, format="PNG")
        good.append((f"good-{i:04d}", {"png": buffer.getvalue()}))
    odd = [("bomb", {"png": _bomb_png(100_000, 100_000)}), ("empty", {"png": b""}), ("no-image", {"txt": b"hi"})]
    records = [*odd, *[record for pair in itertools.zip_longest(fuzz, good) for record in pair if record]]
    lake = tmp_path / "lake"
    lake.mkdir()
    write_shard(lake / "shard-000000.tar", records)

    loader = BatchLoader(partial(WebDatasetSource, str(lake), mode="once"), None, BATCH, "png", 1, 28)
    messages = drain(loader, 120)
    assert isinstance(messages[-1], End)
    trained = [key for m in messages if isinstance(m, Batch) for key in m.keys]
    rejected = {m.key: m.reason for m in messages if isinstance(m, Reject)}
    assert len(trained) == len(set(trained)) and not set(trained) & set(rejected)
    handled = set(trained) | set(rejected)
    # Once mode drops the last incomplete batch: at most BATCH - 1 decodable records are neither.
    assert handled <= {key for key, _ in records} and len(records) - len(handled) < BATCH
    assert {"good-0000", "good-0031"} <= set(trained)
    assert rejected["bomb"] == "image_too_large" and rejected["empty"] == "empty_value"  # as Kafka calls zero bytes
    assert rejected["no-image"] == "missing_image"
    assert set(rejected.values()) <= {"corrupt_image", "missing_image", "empty_value", "decoder_crash", "image_too_large"}
    assert 100 < len(rejected) < 600  # the fuzz finds both: mutations that still decode, and ones that do not
    for message in messages:
        if isinstance(message, Batch):
            assert message.images.dtype.is_floating_point is False and tuple(message.images.shape) == (BATCH, 1, 28, 28)
