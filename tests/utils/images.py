"""Generated test images: distinct, structured pictures (no binary fixtures in git)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw


def make_picture(seed: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A deterministic RGB picture: gradient background plus random shapes."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack(
        [
            (x / w * rng.uniform(60, 255) + rng.uniform(0, 80)) % 256,
            (y / h * rng.uniform(60, 255) + rng.uniform(0, 80)) % 256,
            ((x + y) / (w + h) * rng.uniform(60, 255)) % 256,
        ],
        axis=-1,
    ).astype(np.uint8)
    image = Image.fromarray(base, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 9))):
        x0, y0 = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
        x1, y1 = x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=color)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=color)
    return image


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def framed(
    picture: Image.Image,
    sides: tuple[int, int, int, int] = (16, 16, 16, 16),
    colour: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """picture pasted on a canvas with (left, top, right, bottom) pixels of colour:
    a frame, a slide margin, a letterbox."""
    left, top, right, bottom = sides
    w, h = picture.size
    canvas = Image.new("RGB", (w + left + right, h + top + bottom), colour)
    canvas.paste(picture, (left, top))
    return canvas


def make_image_bytes(
    seed: int, fmt: str = "PNG", size: tuple[int, int] = (160, 120)
) -> bytes:
    return encode(
        make_picture(seed, size), fmt, **({"quality": 90} if fmt == "JPEG" else {})
    )


def jpeg_copy(data: bytes, quality: int = 50) -> bytes:
    """Re-encode as JPEG at the given quality (a typical teacher's copy)."""
    return encode(Image.open(io.BytesIO(data)).convert("RGB"), "JPEG", quality=quality)


def crop_copy(data: bytes, keep: float = 0.9) -> bytes:
    """Centre crop keeping `keep` of each side, saved as PNG."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    dw, dh = int(w * (1 - keep) / 2), int(h * (1 - keep) / 2)
    return encode(im.crop((dw, dh, w - dw, h - dh)), "PNG")
