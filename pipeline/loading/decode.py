"""One record → uint8 pixels, the same way in every path (loader process, Ray Data tasks).

Two shapes: [C, size, size] (`full_side` 0: every image resized to size x size, with data.full_resolution false
or a replay buffer; `decoded_side` says which), or [C, h, w] with the image's own aspect ratio, shrunk (never
enlarged) to at most full_side² pixels, for `BatchAugment` to random-resized-crop from (`full_resolution_side`).
JPEGs are decoded at the smallest DCT scale that still covers the target (`draft`), so a 40-megapixel photo never
exists in full.

Modes: 16- and 32-bit integer grey keep their top 8 of 16 bits; RGBA, LA and palette images with
transparency are composited on white (what a viewer shows, rather than whatever colour hides under
transparent pixels); CMYK, palette, 1-bit and the rest convert with Pillow; then to "L" (channels 1, ITU-R
601 luma) or "RGB" (channels 3, grey replicated). An image over Pillow's decompression-bomb limit is refused
before decoding (`image_too_large`).

Decoding goes through Pillow only. torchvision's libpng binding decodes small PNGs faster (1.3–1.6× here),
but a 79-byte corrupt PNG ("bad adaptive filter value") segfaults it, and a segfault takes the whole loader
process down; Pillow rejects the same bytes with an exception. A decoder that still crashes is survived
by the loader (see loader.py), at the cost of a restart, so the decoder that does not crash is the default.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from streamssl.streams.records import Record

if TYPE_CHECKING:
    from streamssl.pipeline.config import Config

IMAGE_FIELDS = ("png", "jpg", "jpeg", "webp")
# Pillow's decompression-bomb limit: past this many pixels an image is refused before decoding.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
# Pillow warns when opening an image between this limit and twice it; `decode_image` refuses those itself, with a
# dead letter, so the warning would only repeat it on stderr for every such record.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
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


def _to_channels(image: Image.Image, channels: int) -> Image.Image:
    image = _to_8_bit(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("L" if channels == 1 else "RGB")


def full_resolution_side(size: int, min_crop_area: float) -> int:
    """The geometric-mean side an image is decoded at so that a crop of `min_crop_area` of it (the smallest
    random-resized crop) still has about `size` source pixels across: size / sqrt(min_crop_area), at most
    4 x size (a crop of 1/16 of the area), which bounds a batch's memory whatever augment.crop_scale says."""
    return min(math.ceil(size / math.sqrt(min_crop_area)), 4 * size)


def decoded_side(cfg: Config) -> int:
    """The `full_side` a run decodes at, whichever path feeds it: `full_resolution_side` with data.full_resolution,
    0 (size x size) without it or with a replay buffer, which holds size x size images."""
    if not cfg.data.full_resolution or cfg.replay.capacity:
        return 0
    return full_resolution_side(cfg.data.size, cfg.augment.crop_scale[0])


def _shrunk(width: int, height: int, full_side: int) -> tuple[int, int]:
    if width * height <= full_side * full_side:
        return width, height
    factor = full_side / math.sqrt(width * height)
    return max(1, round(width * factor)), max(1, round(height * factor))


def decode_image(data: bytes, channels: int, size: int, full_side: int = 0) -> np.ndarray:
    """uint8 [C, size, size], or [C, h, w] when `full_side` > 0 (see above); raises ValueError('corrupt_image: …' /
    'image_too_large: …')."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
            if width * height > MAX_PIXELS:
                raise Image.DecompressionBombError(f"{width}x{height} pixels exceeds the decompression-bomb limit "
                                                   f"({MAX_PIXELS})")
            target = _shrunk(width, height, full_side) if full_side else (size, size)
            if opened.format == "JPEG":
                opened.draft(None, target)  # decodes at 1/2, 1/4 or 1/8 scale where that still covers the target
            image = _to_channels(opened, channels)
            if image.size != target:
                image = image.resize(target, Image.Resampling.BILINEAR)
            pixels = np.asarray(image)
    except Image.DecompressionBombError as err:  # Pillow's own check, at twice the limit, raises this too
        raise ValueError(f"image_too_large: {str(err).splitlines()[0]}") from None
    except (OSError, SyntaxError, ValueError, TypeError) as err:
        raise ValueError(f"corrupt_image: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    return pixels.reshape(target[1], target[0], channels).transpose(2, 0, 1)


def decode_record(record: Record, image_field: str, channels: int, size: int, max_bytes: int = 0,
                  full_side: int = 0) -> np.ndarray:
    """As `decode_image`; raises ValueError('missing_image' / 'empty_value' / 'oversized_record: …' / 'corrupt_image: …' /
    'image_too_large: …')."""
    names = (image_field, *IMAGE_FIELDS, "bin")  # "bin": a Kafka value of unsniffed type (GIF, BMP, garbage)
    data = next((record.fields[name] for name in names if name in record.fields), None)
    if data is None:
        raise ValueError("missing_image")
    if not data:  # a zero-byte member: what a Kafka source calls an empty value (streams/kafka_source.py)
        raise ValueError("empty_value")
    if max_bytes and len(data) > max_bytes:
        raise ValueError(f"oversized_record: {len(data)} bytes > data.max_record_bytes {max_bytes}")
    return decode_image(data, channels, size, full_side)


def decode_or_reason(record: Record, image_field: str, channels: int, size: int, max_bytes: int = 0,
                     full_side: int = 0) -> tuple[np.ndarray | None, str, str]:
    """(pixels, "", "") as `decode_record`, or (None, reason, detail) for a record it refuses. Any other exception a
    decoder raises is this record's problem too, not the stream's: `corrupt_image` with its type and message."""
    try:
        return decode_record(record, image_field, channels, size, max_bytes, full_side), "", ""
    except ValueError as err:  # the decoder's refusals: 'reason: detail'
        reason, _, detail = str(err).partition(": ")
        return None, reason, detail
    except Exception as err:
        return None, "corrupt_image", f"{type(err).__name__}: {err}"[:500]
