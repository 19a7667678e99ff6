"""The encoder's decode path on real-world image variants and on hostile bytes."""

from __future__ import annotations

import io
import struct
import zlib
from functools import cache

import numpy as np
import pytest
from PIL import Image

from copyfree.errors import InvalidInput
from copyfree.preprocess import decode
from copyfree_encoder.model import BundleModel, EncodedImage, Encoder
from tests.utils.images import encode, jpeg_copy, make_image_bytes, make_picture
from tests.utils.tiny_bundles import make_detection_bundle, make_retrieval_bundle

WHITE = (255, 255, 255)
RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    root = tmp_path_factory.mktemp("bundles")
    return Encoder(
        BundleModel(make_detection_bundle(root / "detection"), providers="cpu"),
        BundleModel(make_retrieval_bundle(root / "retrieval"), providers="cpu"),
        max_image_bytes=1024 * 1024,
        max_pixels=4_000_000,
    )


def _encode_one(encoder: Encoder, data: bytes) -> EncodedImage:
    (result,) = encoder.encode_images([data])
    assert isinstance(result, EncodedImage), result
    return result


def _hamming(a: bytes | None, b: bytes | None) -> int:
    assert a is not None and b is not None
    return int(
        np.unpackbits(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum()
    )


def _near(pixel: object, want: tuple[int, ...], tol: int = 12) -> bool:
    assert isinstance(pixel, tuple)
    return all(abs(int(p) - w) <= tol for p, w in zip(pixel, want, strict=True))


def png_bomb(side: int = 30000) -> bytes:
    """A real decompression bomb: ~110 KB of PNG declaring side x side 1-bit pixels."""
    return _png_bomb(side)


@cache
def _png_bomb(side: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    rows = bytes(1 + (side + 7) // 8) * 1000  # filter byte + packed row, 1000 rows
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(rows) for _ in range(side // 1000))
    idat += compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (160, 120), BLUE)
    image.paste(RED, (0, 0, 40, 30))  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(image, "JPEG", quality=95, exif=exif.tobytes())

    decoded = decode(data)

    assert decoded.size == (120, 160)
    assert _near(decoded.getpixel((110, 10)), RED, 40)  # marker now top-right
    assert _near(decoded.getpixel((10, 10)), BLUE, 40)


def test_encoder_reports_size_after_exif_orientation(encoder: Encoder) -> None:
    image = make_picture(3)
    exif = Image.Exif()
    exif[0x0112] = 8
    result = _encode_one(
        encoder, encode(image, "JPEG", quality=95, exif=exif.tobytes())
    )
    assert (result.width, result.height) == (120, 160)


def test_rgba_is_composited_on_white() -> None:
    image = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent red
    image.paste((0, 0, 255, 255), (20, 0, 40, 20))  # opaque blue
    image.paste((0, 0, 0, 128), (20, 20, 40, 40))  # half-transparent black

    decoded = decode(encode(image, "PNG"))

    assert decoded.mode == "RGB"
    assert decoded.getpixel((5, 5)) == WHITE
    assert decoded.getpixel((30, 5)) == BLUE
    assert _near(decoded.getpixel((30, 30)), (127, 127, 127), 2)


def test_grayscale_with_alpha_is_composited_on_white() -> None:
    image = Image.new("LA", (20, 20), (0, 0))
    assert decode(encode(image, "PNG")).getpixel((3, 3)) == WHITE


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_is_white(fmt: str) -> None:
    image = Image.new("P", (40, 40), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)  # 0 = red, 1 = blue
    image.paste(1, (20, 0, 40, 40))

    decoded = decode(encode(image, fmt, transparency=0))

    assert decoded.getpixel((5, 5)) == WHITE
    assert decoded.getpixel((30, 5)) == BLUE


def test_16_bit_png_is_scaled_not_clipped() -> None:
    arr = np.zeros((40, 60), dtype=np.uint16)
    arr[:, 20:40] = 32768
    arr[:, 40:] = 65535
    data = encode(Image.fromarray(arr), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really 16 bits

    decoded = np.asarray(decode(data))

    assert decoded.shape == (40, 60, 3)
    assert (decoded[:, :20] == 0).all()
    assert (np.abs(decoded[:, 20:40].astype(int) - 128) <= 1).all()
    assert (decoded[:, 40:] == 255).all()


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("BMP", {}), ("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"})]
    + [("WEBP", {"lossless": True}), ("PNG", {"optimize": True})],
)
def test_lossless_formats_give_identical_keys(
    encoder: Encoder, fmt: str, params: dict[str, object]
) -> None:
    picture = make_picture(5)
    want = _encode_one(encoder, encode(picture, "PNG"))
    got = _encode_one(encoder, encode(picture, fmt, **params))
    assert (got.width, got.height) == (160, 120)
    assert got.first_key == want.first_key
    assert got.code == want.code
    assert got.second_key is not None and want.second_key is not None
    assert np.array_equal(got.second_key, want.second_key)


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("GIF", {}), ("WEBP", {"quality": 60}), ("JPEG", {"quality": 50})],
)
def test_lossy_formats_land_within_a_few_bits(
    encoder: Encoder, fmt: str, params: dict[str, object]
) -> None:
    picture = make_picture(6)
    want = _encode_one(encoder, encode(picture, "PNG"))
    got = _encode_one(encoder, encode(picture, fmt, **params))
    assert _hamming(got.first_key, want.first_key) <= 6
    assert _hamming(got.code, want.code) <= 3


def test_jpeg_copies_stay_close_and_distinct_pictures_stay_apart(
    encoder: Encoder,
) -> None:
    originals = [make_image_bytes(seed) for seed in range(12)]
    copies = [jpeg_copy(data, 50) for data in originals]
    encoded = encoder.encode_images(originals + copies)
    assert all(isinstance(e, EncodedImage) for e in encoded)
    keys = [e.first_key for e in encoded if isinstance(e, EncodedImage)]
    orig, copy = keys[:12], keys[12:]
    assert max(_hamming(a, b) for a, b in zip(orig, copy, strict=True)) <= 4
    apart = [_hamming(orig[i], orig[j]) for i in range(12) for j in range(i + 1, 12)]
    assert min(apart) > 12  # the detection radius T1 of the manifest


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "empty"),
        (b"this is not an image at all" * 4, "not a JPEG, PNG"),
        (make_image_bytes(1, "JPEG", (320, 240))[:1500], "truncated"),
        (make_image_bytes(1, "PNG")[:400], "truncated"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "could not be decoded"),
    ],
    ids=["empty", "not-an-image", "truncated-jpeg", "truncated-png", "broken-png"],
)
def test_bad_bytes_are_invalid_input_naming_the_problem(
    encoder: Encoder, data: bytes, words: str
) -> None:
    with pytest.raises(InvalidInput, match=words):
        encoder.prepare(data, frozenset({"detection", "retrieval"}))


def test_decompression_bomb_is_refused_before_decoding(encoder: Encoder) -> None:
    bomb = png_bomb()
    assert len(bomb) < 200_000
    with pytest.raises(InvalidInput, match="pixels"):
        encoder.prepare(bomb, frozenset({"detection"}))


def test_pixel_limit_applies_below_pillows_own_bomb_limit(encoder: Encoder) -> None:
    data = encode(Image.new("L", (2500, 2000)), "PNG")  # 5M pixels > 4M limit
    with pytest.raises(InvalidInput, match="pixels"):
        encoder.prepare(data, frozenset({"detection"}))


def test_byte_limit(encoder: Encoder) -> None:
    data = b"\xff\xd8" + bytes(encoder.max_image_bytes)
    with pytest.raises(InvalidInput, match="bytes"):
        encoder.prepare(data, frozenset({"detection"}))


def test_encode_images_reports_bad_items_without_failing_the_rest(
    encoder: Encoder,
) -> None:
    results = encoder.encode_images([make_image_bytes(1), b"", make_image_bytes(2)])
    assert isinstance(results[0], EncodedImage)
    assert isinstance(results[1], InvalidInput)
    assert isinstance(results[2], EncodedImage)
    assert results[0].first_key != results[2].first_key
