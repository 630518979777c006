"""Decoding: every image kind gives uint8 pixels or one reason, the same in the loader process and in Ray Data."""

from __future__ import annotations

import io
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from streamssl.pipeline.loading.decode import decode_record, record_id
from streamssl.pipeline.loading.loader import BatchLoader
from streamssl.pipeline.loading.messages import Batch, Reject
from streamssl.pipeline.ray.feed import decode_rows
from streamssl.streams.lake import write_shard
from streamssl.streams.records import Record
from streamssl.streams.webdataset_source import WebDatasetSource
from tests.conftest import read_to_end


def _encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _ramp16() -> np.ndarray:
    return (np.arange(28 * 28, dtype=np.uint32).reshape(28, 28) * 83 % 65536).astype(np.uint16)


def _decode(data: bytes, channels: int = 1, max_bytes: int = 0) -> np.ndarray:
    return decode_record(Record("k", {"png": data}, "s", 0), "png", channels, 28, max_bytes)


def test_a_16_bit_png_is_scaled_to_8_bits_not_wrapped() -> None:
    wide = _ramp16()
    pixels = _decode(_encoded(Image.fromarray(wide)))
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 28, 28)
    assert np.array_equal(pixels[0], (wide >> 8).astype(np.uint8))
    assert np.array_equal(_decode(_encoded(Image.fromarray(wide)), channels=3)[1], (wide >> 8).astype(np.uint8))
    # 32-bit integer images (TIFF) follow the same 16-bit convention
    tiff = _encoded(Image.fromarray(wide.astype(np.int32)), "TIFF")
    assert np.array_equal(_decode(tiff)[0], (wide >> 8).astype(np.uint8))


def test_the_ray_path_decodes_a_16_bit_png_exactly_like_the_loader() -> None:
    data = _encoded(Image.fromarray(_ramp16()))
    rows = {"key": np.array(["a"], dtype=object), "source": np.array(["s"], dtype=object),
            "image": np.array([data], dtype=object)}
    decoded = decode_rows(rows, image_field="png", channels=1, size=28)
    assert decoded["reason"][0] == ""
    assert np.array_equal(decoded["image"][0], _decode(data))


@pytest.mark.parametrize("mode", ["RGBA", "P", "LA", "1", "F", "CMYK"])
def test_other_modes_decode_to_the_configured_channels(mode: str) -> None:
    grey = Image.fromarray((np.arange(28 * 28).reshape(28, 28) % 256).astype(np.uint8))
    image = grey.convert(mode)
    data = _encoded(image, "JPEG" if mode == "CMYK" else "TIFF" if mode == "F" else "PNG")
    for channels in (1, 3):
        pixels = _decode(data, channels)
        assert pixels.dtype == np.uint8 and pixels.shape == (channels, 28, 28)
    assert _decode(data).std() > 10  # a picture, not a blank


def test_an_oversized_record_is_refused_before_it_is_decoded() -> None:
    data = _encoded(Image.new("L", (28, 28)))
    assert _decode(data, max_bytes=len(data)).shape == (1, 28, 28)
    with pytest.raises(ValueError, match=rf"^oversized_record: {len(data)} bytes"):
        _decode(data, max_bytes=len(data) - 1)


@pytest.mark.parametrize("data", [b"\x89PNG\r\n\x1a\n", b"GIF89a" + b"\x00" * 10, b"\xff\xd8\xff" + b"\x00" * 50])
def test_garbage_is_a_corrupt_image(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"^corrupt_image: "):
        _decode(data)


def test_zero_bytes_are_an_empty_value_as_on_kafka() -> None:
    with pytest.raises(ValueError, match=r"^empty_value$"):
        _decode(b"")


def test_record_ids_of_tar_names_that_are_not_utf8_are_stable() -> None:
    name = b"caf\xe9-0001".decode("utf-8", "surrogateescape")  # how tarfile hands out a Latin-1 member name
    assert record_id(name) == record_id(name) != record_id("cafe-0001")
    assert 0 <= record_id(name) < 2**63


def test_the_loader_dead_letters_a_record_over_data_max_record_bytes(tmp_path: Path) -> None:
    small = _encoded(Image.new("L", (28, 28)))
    big = _encoded(Image.fromarray(np.frombuffer(np.random.default_rng(0).bytes(512 * 512), np.uint8).reshape(512, 512)))
    lake = tmp_path / "lake"
    lake.mkdir()
    write_shard(lake / "shard-000000.tar", [("a", {"png": small}), ("big", {"png": big}), ("b", {"png": small})])
    loader = BatchLoader(partial(WebDatasetSource, str(lake), mode="once"), None, 2, "png", 1, 28,
                         max_record_bytes=len(big) - 1)
    messages = read_to_end(loader, 20)
    assert [(m.key, m.reason) for m in messages if isinstance(m, Reject)] == [("big", "oversized_record")]
    assert [m.keys for m in messages if isinstance(m, Batch)] == [["a", "b"]]
