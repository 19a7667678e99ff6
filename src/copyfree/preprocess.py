"""The one image pipeline used by training, the encoder and evaluation:
bytes -> decoded RGB (EXIF applied, alpha on white, size limits) -> model input."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageFilter, ImageOps

from copyfree.errors import InvalidInput

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000


@dataclass(frozen=True)
class PreprocessSpec:
    """How a model wants its input; travels inside each model bundle's manifest.

    channels=1 means grayscale (ITU-R 601-2 luma, Pillow's "L"), 3 means RGB.
    Images are squared by direct resize (no aspect-preserving crop): a copy that was
    padded or letterboxed still lands near its original for both pipelines alike.
    """

    size: int = 224
    channels: int = 3
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    resample: str = "bilinear"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        return cls(
            size=int(d["size"]),
            channels=int(d["channels"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            resample=str(d.get("resample", "bilinear")),
            extra=dict(d.get("extra", {})),
        )


_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
}


def decode(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Encoded image bytes -> RGB PIL image, fully loaded. Raises InvalidInput.

    Checks the byte and pixel limits *before* decoding pixels, so a decompression bomb
    (a tiny PNG declaring 30000x30000) is refused without allocating its bitmap.
    Transparency is composited on white; EXIF orientation is applied.
    """
    if not data:
        raise InvalidInput("image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise InvalidInput(f"image is {len(data)} bytes, limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidInput(
                    f"image is {width}x{height} = {width * height} pixels, "
                    f"limit is {max_pixels}"
                )
            image.load()
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's own guard fires inside open() for sizes far past ours.
        raise InvalidInput(
            f"image refused (limit is {max_pixels} pixels; decompression bomb?): {e}"
        ) from None
    except Image.UnidentifiedImageError:
        # Pillow's own message names a BytesIO object; say what the caller can act on.
        raise InvalidInput(
            "image could not be decoded: not a JPEG, PNG, WebP, GIF, BMP or TIFF "
            f"image ({len(data)} bytes starting {data[:8]!r})"
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        # Pillow reports truncated/corrupt data as OSError, some plugins as
        # SyntaxError/ValueError.
        raise InvalidInput(f"image could not be decoded: {e}") from None
    image = ImageOps.exif_transpose(image) or image
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, transparency composited on white."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "RGBa"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits rather than clip at 255.
        arr = np.asarray(image, dtype=np.float64)
        top = arr.max() if arr.size else 1.0
        arr8 = (arr * (255.0 / top) if top > 255 else arr).clip(0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


# Border trimming. A line (row or column) belongs to a uniform border when at least
# BORDER_LINE_SHARE of its pixels are within BORDER_FUZZ levels (every channel) of the
# colour of the outermost line on that side, as they are or after a 3x3 median (the
# median forgives JPEG ringing and noise). Lines are judged on a copy at most
# BORDER_PROBE pixels on its longer side, from each edge inwards up to the first line
# that is not border; each edge is then placed to the pixel on the image itself (raw
# pixels, the few lines around the probe's estimate).
BORDER_PROBE = 128
BORDER_FUZZ = 24
BORDER_LINE_SHARE = 0.98
BORDER_MAX_SIDE = 0.45  # never trim more than this share of the image from one side
BORDER_MIN_SIDE = 8  # pixels left on each axis, or the image is left as it is
# Opposite sides whose borders differ by at most this share of the image surround the
# picture (trim it); more, and the border is a shifted copy's fill (shift it back).
BORDER_BALANCE = 0.05
_BORDER_BLOCK = 8  # lines judged per numpy step (a border is usually a few of them)

Lines = NDArray[np.int16]  # (lines, pixels, 3), outermost line first


def _border_run(raw: Lines, smooth: Lines | None, background: NDArray[Any]) -> int:
    """How many leading lines are border; len(raw) when all of them are."""
    for start in range(0, len(raw), _BORDER_BLOCK):
        block = slice(start, start + _BORDER_BLOCK)
        close = np.abs(raw[block] - background).max(axis=2) <= BORDER_FUZZ
        if smooth is not None:
            close |= np.abs(smooth[block] - background).max(axis=2) <= BORDER_FUZZ
        not_border = np.flatnonzero(close.mean(axis=1) < BORDER_LINE_SHARE)
        if not_border.size:
            return start + int(not_border[0])
    return len(raw)


def _rgb(image: Image.Image) -> Image.Image:
    """The image in RGB, without a copy when it already is (decode's output is)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def _side(
    image: Image.Image,
    probe: tuple[Lines, Lines],
    side: str,
    span: tuple[int, int],
) -> int | None:
    """Border width in image pixels on `side` ("top", "bottom", "left", "right"),
    across `span` (the image's columns for top/bottom, rows for left/right); None when
    the probe is uniform all the way across (a flat image, not a border)."""
    raw, smooth = probe
    background = np.median(raw[0], axis=0)
    run = _border_run(raw, smooth, background)
    if run == len(raw):
        return None
    if run == 0:
        return 0
    along = image.height if side in ("top", "bottom") else image.width
    scale = along / len(raw)
    limit = int(BORDER_MAX_SIDE * along)
    lo = max(0, round(run * scale) - math.ceil(scale) - 1)
    hi = min(limit, round(run * scale) + math.ceil(scale) + 1)
    if lo >= hi:
        return limit
    a, b = span
    window = {
        "top": (a, lo, b, hi),
        "bottom": (a, along - hi, b, along - lo),
        "left": (lo, a, hi, b),
        "right": (along - hi, a, along - lo, b),
    }[side]
    lines = np.asarray(image.crop(window), dtype=np.int16)
    if side in ("left", "right"):
        lines = lines.transpose(1, 0, 2)
    if side in ("bottom", "right"):
        lines = lines[::-1]
    return lo + _border_run(lines, None, background)


def border_box(image: Image.Image) -> tuple[int, int, int, int] | None:
    """The (left, top, right, bottom) box inside a uniform border (a frame, slide
    margin, letterbox, screenshot background), or None when there is none to trim.

    Each side has its own background colour (the median of its outermost line); top
    and bottom are found first, left and right on the rows between them. A border
    thinner than one probe pixel (1/BORDER_PROBE of the longer side) is left: it
    barely moves the model's input."""
    image = _rgb(image)
    width, height = image.size
    small = image.copy()
    small.thumbnail((BORDER_PROBE, BORDER_PROBE), Image.Resampling.BILINEAR)
    raw = np.asarray(small, dtype=np.int16)
    smooth = np.asarray(small.filter(ImageFilter.MedianFilter(3)), dtype=np.int16)
    top = _side(image, (raw, smooth), "top", (0, width))
    bottom = _side(image, (raw[::-1], smooth[::-1]), "bottom", (0, width))
    if top is None or bottom is None or top + bottom >= height - BORDER_MIN_SIDE:
        return None
    # Left and right over the rows between the top and bottom borders.
    t = math.ceil(top * small.height / height)
    b = small.height - math.ceil(bottom * small.height / height)
    cols = (raw[t:b].transpose(1, 0, 2), smooth[t:b].transpose(1, 0, 2))
    left = _side(image, cols, "left", (top, height - bottom))
    right = _side(
        image, (cols[0][::-1], cols[1][::-1]), "right", (top, height - bottom)
    )
    if left is None or right is None or left + right >= width - BORDER_MIN_SIDE:
        return None
    if top == bottom == left == right == 0:
        return None
    return (left, top, width - right, height - bottom)


def trim_border(image: Image.Image) -> Image.Image | None:
    """The image with its uniform border (see border_box) undone; None when it has
    none. A border around the picture (a frame, a slide margin, a letterbox: opposite
    sides within BORDER_BALANCE of each other) is cropped off. A lopsided one, the
    fill a shifted copy leaves on one side, is moved to the opposite side on the same
    canvas, which puts the picture back where the unshifted image has it."""
    box = border_box(image)
    if box is None:
        return None
    width, height = image.size
    left, top = box[0], box[1]
    right, bottom = width - box[2], height - box[3]
    if (
        abs(left - right) <= BORDER_BALANCE * width
        and abs(top - bottom) <= BORDER_BALANCE * height
    ):
        return image.crop(box)
    rgb = _rgb(image)
    # The fill is the colour of the widest border's outermost line.
    widest = max(
        (left, (0, 0, 1, height)),
        (top, (0, 0, width, 1)),
        (right, (width - 1, 0, width, height)),
        (bottom, (0, height - 1, width, height)),
    )[1]
    line = np.asarray(rgb.crop(widest)).reshape(-1, 3)
    fill = tuple(int(v) for v in np.median(line, axis=0))
    shifted = Image.new("RGB", image.size, fill)
    shifted.paste(rgb.crop(box), (right, bottom))
    return shifted


def to_input(image: Image.Image, spec: PreprocessSpec) -> NDArray[np.float32]:
    """RGB image -> (channels, size, size) float32, scaled to [0,1] then normalised."""
    if spec.channels == 1:
        image = image.convert("L")
    elif image.mode != "RGB":
        image = image.convert("RGB")
    resized = image.resize((spec.size, spec.size), _RESAMPLE[spec.resample])
    arr = np.asarray(resized, dtype=np.float32) / np.float32(255.0)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(
        ((arr - mean) / std).transpose(2, 0, 1), dtype=np.float32
    )


def batch_inputs(
    images: list[Image.Image], spec: PreprocessSpec
) -> NDArray[np.float32]:
    """List of RGB images -> (n, channels, size, size) float32."""
    if not images:
        return np.zeros((0, spec.channels, spec.size, spec.size), dtype=np.float32)
    return np.stack([to_input(im, spec) for im in images])
