"""The one preprocessing pipeline: decoding rules, limits and tensor layout."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from copyfree.errors import InvalidInput
from copyfree.preprocess import (
    BORDER_MAX_SIDE,
    PreprocessSpec,
    border_box,
    decode,
    to_input,
    trim_border,
)
from tests.utils.images import encode, framed, make_image_bytes, make_picture


def test_decode_refuses_empty_bytes() -> None:
    with pytest.raises(InvalidInput, match="empty"):
        decode(b"")


def test_decode_refuses_non_image() -> None:
    with pytest.raises(InvalidInput, match="could not be decoded"):
        decode(b"this is plain text, not an image")


def test_decode_refuses_truncated_jpeg() -> None:
    data = make_image_bytes(1, "JPEG")
    with pytest.raises(InvalidInput, match="could not be decoded"):
        decode(data[: len(data) // 2])


def test_decode_refuses_decompression_bomb_before_allocating() -> None:
    bomb = encode(Image.new("1", (30000, 30000)), "PNG")  # ~100 KB file, 900 MP
    assert len(bomb) < 1_000_000
    with pytest.raises(InvalidInput, match="900000000 pixels"):
        decode(bomb)


def test_decode_refuses_pixels_over_our_limit() -> None:
    with pytest.raises(InvalidInput, match="160x120 = 19200 pixels, limit is 1000"):
        decode(make_image_bytes(2), max_pixels=1000)


def test_decode_refuses_oversized_bytes() -> None:
    with pytest.raises(InvalidInput, match="limit is 100"):
        decode(make_image_bytes(2), max_bytes=100)


def test_decode_composites_alpha_on_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert decode(encode(rgba, "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_decode_applies_exif_orientation() -> None:
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif)
    assert decode(buf.getvalue()).size == (20, 40)


def test_to_input_layout_and_normalisation() -> None:
    spec = PreprocessSpec(
        size=32, channels=3, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
    )
    x = to_input(make_picture(3), spec)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    assert -1.0 <= x.min() and x.max() <= 1.0


def test_to_input_grayscale() -> None:
    spec = PreprocessSpec(size=128, channels=1, mean=(0.0,), std=(1.0,))
    x = to_input(make_picture(4), spec)
    assert x.shape == (1, 128, 128) and 0.0 <= x.min() and x.max() <= 1.0


def test_spec_round_trips_through_dict() -> None:
    spec = PreprocessSpec(size=128, channels=1, mean=(0.1,), std=(0.2,))
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec


# ---- border trimming ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("sides", "colour"),
    [
        ((16, 16, 16, 16), (255, 255, 255)),  # a white frame
        ((0, 30, 0, 30), (0, 0, 0)),  # letterbox
        ((40, 0, 40, 0), (12, 80, 200)),  # pillarbox on a coloured slide
        ((20, 40, 90, 30), (255, 255, 255)),  # uneven margins
    ],
)
@pytest.mark.parametrize("size", [(160, 120), (900, 700)])
def test_border_box_finds_the_picture_inside_a_border(
    sides: tuple[int, int, int, int],
    colour: tuple[int, int, int],
    size: tuple[int, int],
) -> None:
    """To the pixel, also when the image is many times the probe's size."""
    picture = make_picture(3, size)
    copy = framed(picture, sides, colour)
    left, top, _, _ = sides
    assert border_box(copy) == (
        left,
        top,
        left + picture.width,
        top + picture.height,
    )


@pytest.mark.parametrize(
    "sides", [(16, 16, 16, 16), (0, 30, 0, 30), (40, 0, 44, 0), (9, 9, 9, 9)]
)
def test_a_border_around_the_picture_is_cropped_off(
    sides: tuple[int, int, int, int],
) -> None:
    picture = make_picture(3)
    trimmed = trim_border(framed(picture, sides, (255, 255, 255)))
    assert trimmed is not None
    assert np.array_equal(np.asarray(trimmed), np.asarray(picture))


def test_a_lopsided_border_is_moved_back_across() -> None:
    """A copy shifted right by 40 pixels with black fill (its right edge pushed off the
    canvas): the view puts the picture back where it was, black where the lost strip
    was."""
    picture = make_picture(3)
    shifted = Image.new("RGB", picture.size, (0, 0, 0))
    shifted.paste(picture, (40, 0))
    view = trim_border(shifted)
    assert view is not None and view.size == picture.size
    expected = np.asarray(picture).copy()
    expected[:, picture.width - 40 :] = 0
    assert np.array_equal(np.asarray(view), expected)


def test_border_box_survives_jpeg_and_large_images() -> None:
    """A framed picture re-saved as JPEG and 4x larger than the probe: the box lands
    within the probe's resolution of the truth."""
    picture = make_picture(4, (800, 600))
    copy = framed(picture, (100, 60, 100, 60), (255, 255, 255))
    again = decode(encode(copy, "JPEG", quality=75))
    box = border_box(again)
    assert box is not None
    truth = (100, 60, 900, 660)
    assert all(abs(a - b) <= 6 for a, b in zip(box, truth, strict=True)), box


def test_no_border_no_box() -> None:
    assert border_box(make_picture(5)) is None
    assert trim_border(make_picture(5)) is None


def test_a_uniform_image_is_not_trimmed_to_nothing() -> None:
    blank = Image.new("RGB", (200, 100), (240, 240, 240))
    assert border_box(blank) is None


def test_at_most_a_share_of_each_side_is_trimmed() -> None:
    """A thin picture on a vast margin: the trim stops at BORDER_MAX_SIDE per side."""
    copy = framed(make_picture(6, (40, 40)), (400, 400, 400, 400))
    box = border_box(copy)
    assert box is not None
    limit = int(BORDER_MAX_SIDE * copy.width)
    assert box[:2] == (limit, limit)
