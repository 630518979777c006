"""Seeded mutations of small real images: the decode fuzz of tests/pipeline/test_decode_fuzz.py and bench/decode_fuzz.py."""

from __future__ import annotations

import io
import random
from collections.abc import Iterator

import numpy as np
from PIL import Image

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def seed_images(rng: random.Random, count: int = 24) -> list[bytes]:
    """Small valid images in every format, grey and colour, 8 and 16 bit: what the mutations start from."""
    seeds = []
    for index in range(count):
        fmt = FORMATS[index % len(FORMATS)]
        size = rng.choice((8, 28, 33))
        pixels = np.frombuffer(rng.randbytes(size * size * 3), dtype=np.uint8).reshape(size, size, 3)
        image = Image.fromarray(pixels).convert(rng.choice(("L", "RGB")) if fmt != "PNG" else rng.choice(("L", "RGB", "I;16")))
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        seeds.append(buffer.getvalue())
    return seeds


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four of: bit flips, byte overwrites, truncation, a duplicated or deleted span, inserted bytes."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        at = rng.randrange(max(1, len(out)))
        if kind == 0 and out:
            out[at] ^= 1 << rng.randrange(8)
        elif kind == 1 and out:
            out[at] = rng.randrange(256)
        elif kind == 2:
            del out[rng.randint(8, max(8, len(out))):]
        elif kind == 3:
            span = out[at:at + rng.randint(1, 32)]
            out[at:at] = span
        elif kind == 4:
            del out[at:at + rng.randint(1, 32)]
        else:
            out[at:at] = rng.randbytes(rng.randint(1, 16))
    return bytes(out)


def mutated_images(seed: int) -> Iterator[bytes]:
    """An endless, reproducible stream of mutated images."""
    rng = random.Random(seed)
    seeds = seed_images(rng)
    while True:
        yield mutate(rng.choice(seeds), rng)
