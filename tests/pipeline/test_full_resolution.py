"""Full-resolution decoding: any size and mode to the configured channels at the image's own aspect ratio, batches
padded to one canvas with each image's extent, and random-resized crops taken inside each image, never squashed."""

from __future__ import annotations

import io
import math
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from streamssl.pipeline.augment import BatchAugment, crop_flip_grids
from streamssl.pipeline.config import AugmentConfig
from streamssl.pipeline.loading.decode import decode_record, full_resolution_side
from streamssl.pipeline.loading.loader_worker import stack_images
from streamssl.streams.records import Record

SIDE = full_resolution_side(64, 0.2)  # 144: what a data.size=64 run with the default crop_scale decodes at


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _photo(width: int, height: int) -> Image.Image:
    """A smooth RGB picture (gradients), so JPEG keeps it recognisable."""
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    return Image.fromarray((np.stack([x, y, (x + y) / 2], axis=-1) * 255).astype(np.uint8))


def _decode(data: bytes, channels: int = 3, full_side: int = SIDE, field: str = "jpg") -> np.ndarray:
    return decode_record(Record("k", {field: data}, "s", 0), field, channels, 64, 0, full_side)


@pytest.mark.parametrize(("width", "height"), [(600, 400), (300, 600), (1920, 1080)])
def test_a_large_image_keeps_its_aspect_and_is_shrunk_to_the_side_a_crop_needs(width: int, height: int) -> None:
    pixels = _decode(_encoded(_photo(width, height), "JPEG"))
    _, decoded_height, decoded_width = pixels.shape
    assert pixels.dtype == np.uint8 and pixels.shape[0] == 3
    assert decoded_height * decoded_width <= (SIDE + 1) ** 2 and math.isclose(decoded_width / decoded_height,
                                                                               width / height, rel_tol=0.02)
    # the smallest crop (20% of the area) still has about data.size source pixels across
    assert math.sqrt(0.2 * decoded_height * decoded_width) >= 64 - 1


def test_the_decoded_side_follows_the_smallest_crop_up_to_four_times_the_size() -> None:
    assert (full_resolution_side(224, 0.2), full_resolution_side(28, 0.2), full_resolution_side(224, 0.01)) == (501, 63, 896)


def test_a_small_image_is_never_enlarged_and_the_squash_path_is_as_before() -> None:
    data = _encoded(_photo(50, 80), "PNG")
    assert _decode(data, field="png").shape == (3, 80, 50)
    assert _decode(data, field="png", full_side=0).shape == (3, 64, 64)  # full_side 0: resized to size x size


def test_transparency_is_composited_on_white_and_modes_reach_the_configured_channels() -> None:
    transparent = Image.new("RGBA", (30, 20), (0, 0, 0, 0))
    assert (_decode(_encoded(transparent, "PNG"), field="png") == 255).all()
    half = Image.new("LA", (30, 20), (0, 128))  # black at half opacity over white: mid-grey
    assert abs(int(_decode(_encoded(half, "PNG"), channels=1, field="png").mean()) - 127) <= 1
    cmyk = _photo(40, 30).convert("CMYK")
    assert _decode(_encoded(cmyk, "JPEG")).shape == (3, 30, 40)
    assert _decode(_encoded(_photo(40, 30).convert("P"), "PNG"), channels=1, field="png").shape == (1, 30, 40)
    wide = (np.arange(30 * 40, dtype=np.uint32).reshape(30, 40) * 53 % 65536).astype(np.uint16)
    assert np.array_equal(_decode(_encoded(Image.fromarray(wide), "PNG"), channels=1, field="png")[0], wide >> 8)
    webp = _decode(_encoded(_photo(60, 40), "WEBP"), field="webp")
    assert webp.shape == (3, 40, 60)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # pytest resets decode.py's own filter
@pytest.mark.parametrize("side", [10_000, 100_000])  # over the limit; over twice the limit (Pillow's own refusal)
def test_an_image_over_the_decompression_bomb_limit_is_image_too_large(side: int) -> None:
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    bomb = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + b"\x00\x00\x00\x00IEND\xaeB`\x82")  # a header declaring side x side pixels, and nothing else
    with pytest.raises(ValueError, match=r"^image_too_large: .*(pixels exceeds the|decompression bomb)"):
        _decode(bomb, field="png")


def test_equal_squares_stack_as_before_and_mixed_sizes_are_padded_with_their_extents() -> None:
    squares = [np.full((3, 28, 28), value, np.uint8) for value in (1, 2)]
    stacked, extents = stack_images(squares)
    assert extents is None and np.array_equal(stacked, np.stack(squares))
    wide, tall = np.arange(3 * 4 * 6, dtype=np.uint8).reshape(3, 4, 6), np.full((3, 5, 2), 9, np.uint8)
    canvas, extents = stack_images([wide, tall])
    assert canvas.shape == (2, 3, 5, 6) and extents.tolist() == [[4, 6], [5, 2]]
    assert np.array_equal(canvas[0, :, :4, :6], wide) and np.array_equal(canvas[0, :, 4], wide[:, 3])  # edge repeated
    assert (canvas[1] == 9).all()


def test_each_crop_lies_inside_its_own_image_and_has_the_drawn_aspect_in_pixels() -> None:
    extents = torch.tensor([[40, 120], [120, 40], [90, 90]])  # wide, tall, square on a 120 x 120 canvas
    grids = crop_flip_grids(3, 16, (0.3, 0.3), (1.0, 1.0), 0.0, torch.Generator().manual_seed(0), torch.device("cpu"),
                            extents, (120, 120))
    # pixel coordinates of the sampling points (align_corners=False: -1 is the canvas's left edge)
    x_px, y_px = (grids[..., 0] + 1) * 60, (grids[..., 1] + 1) * 60
    for row, (height, width) in enumerate(extents.tolist()):
        assert x_px[row].min() >= 0 and x_px[row].max() <= width and y_px[row].min() >= 0 and y_px[row].max() <= height
        crop_width = (x_px[row].max() - x_px[row].min()) * 16 / 15  # centres of 16 samples span 15/16 of the crop
        crop_height = (y_px[row].max() - y_px[row].min()) * 16 / 15
        assert math.isclose(crop_width / crop_height, 1.0, rel_tol=1e-3)  # ratio 1: square in pixels, not squashed
        assert math.isclose(crop_width * crop_height, 0.3 * height * width, rel_tol=1e-3)


def test_augmenting_a_padded_batch_gives_uniform_views_that_never_see_the_padding() -> None:
    image = np.full((3, 30, 90), 200, np.uint8)  # one bright wide image on a canvas padded with black (not edge)
    canvas = np.zeros((1, 3, 90, 90), np.uint8)
    canvas[0, :, :30] = image
    cfg = AugmentConfig(jitter_prob=0.0, blur_prob=0.0)
    views = BatchAugment(cfg, [0.0] * 3, [1.0] * 3, 32)(torch.from_numpy(canvas).repeat(16, 1, 1, 1),
                                                          torch.Generator().manual_seed(3), views=2,
                                                          extents=torch.tensor([[30, 90]] * 16))
    assert [tuple(view.shape) for view in views] == [(16, 3, 32, 32)] * 2
    # Bilinear sampling next to the image's edge reaches at most half a pixel past it: a crop that strayed into
    # the padding would bring whole black rows.
    for view in views:
        assert view.min() >= 0.5 * 200 / 255 and view.mean() > 0.97 * 200 / 255
