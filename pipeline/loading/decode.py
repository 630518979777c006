"""One record → uint8 pixels [C, size, size], the same way in every path (loader process, Ray Data tasks).

Decoding goes through Pillow only. torchvision's libpng binding decodes small PNGs faster (1.3–1.6× here),
but a 79-byte corrupt PNG ("bad adaptive filter value") segfaults it, and a segfault takes the whole loader
process down; Pillow rejects the same bytes with an exception. A decoder that still crashes is survived
by the loader (see loader.py), at the cost of a restart, so the decoder that does not crash is the default.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image

from streamssl.streams.records import Record

IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp")
# Pillow's decompression-bomb limit: past this many pixels an image is refused before decoding.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# Pillow's integer modes with more than 8 bits per sample (PNG 16-bit grey; "I" is 32-bit, from TIFF): read as
# 16-bit values and scaled to 8 bits by their top byte, never wrapped or clipped at 255.
_WIDE = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def record_id(key: str) -> int:
    """A stable non-negative 63-bit id for a record key: the same record maps to the same id in every
    process and run (Python's hash() is salted per process), as memory banks and cluster buffers need.
    A key holding lone surrogates (a name that was not UTF-8, escaped by Python) hashes too, never raises."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def payload(record: Record, image_field: str) -> bytes:
    """The bytes a dead letter keeps for a rejected record: its image field, else its first field."""
    for name in (image_field, *IMAGE_FIELDS, *record.fields):
        if name in record.fields:
            return record.fields[name]
    return b""


def _to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer grey images as 8-bit grey: the top 8 of 16 bits (PNG's 16-bit range)."""
    if image.mode not in _WIDE:
        return image
    wide = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
    return Image.fromarray((wide >> 8).astype(np.uint8), mode="L")


def decode_image(data: bytes, channels: int, size: int) -> np.ndarray:
    """uint8 [C, size, size]; raises ValueError('corrupt_image: …')."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
            if width * height > MAX_PIXELS:
                raise ValueError(f"{width}x{height} pixels exceeds the decompression-bomb limit")
            image = _to_8_bit(opened).convert("L" if channels == 1 else "RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            pixels = np.asarray(image)
    except (OSError, SyntaxError, ValueError, TypeError, Image.DecompressionBombError) as err:
        raise ValueError(f"corrupt_image: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    return pixels.reshape(size, size, channels).transpose(2, 0, 1)


def decode_record(record: Record, image_field: str, channels: int, size: int, max_bytes: int = 0) -> np.ndarray:
    """uint8 [C, size, size]; raises ValueError('missing_image' / 'empty_value' / 'oversized_record: …' /
    'corrupt_image: …')."""
    names = (image_field, *IMAGE_FIELDS, "bin")  # "bin": a Kafka value of unsniffed type (GIF, BMP, garbage)
    data = next((record.fields[name] for name in names if name in record.fields), None)
    if data is None:
        raise ValueError("missing_image")
    if not data:  # a zero-byte member: what a Kafka source calls an empty value (streams/kafka_source.py)
        raise ValueError("empty_value")
    if max_bytes and len(data) > max_bytes:
        raise ValueError(f"oversized_record: {len(data)} bytes > data.max_record_bytes {max_bytes}")
    return decode_image(data, channels, size)
