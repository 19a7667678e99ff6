"""The one image pipeline used by training, the encoder and evaluation:
bytes -> decoded RGB (EXIF applied, alpha on white, size limits) -> model input."""

from __future__ import annotations

import io
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


# Border trimming: a line (row or column) belongs to a uniform border when at least
# BORDER_LINE_SHARE of its pixels are within BORDER_FUZZ grey levels (every channel) of
# the colour of the outermost line on that side, as they are or after a 3x3 median
# (the median forgives JPEG ringing and noise; the raw pixels keep the edge exact).
# Judged on a copy at most BORDER_PROBE pixels on its longer side.
BORDER_PROBE = 256
BORDER_FUZZ = 24
BORDER_LINE_SHARE = 0.98
BORDER_MAX_SIDE = 0.45  # never trim more than this share of the image from one side
BORDER_MIN_SIDE = 8  # pixels left on each axis, or the image is left as it is


def _uniform_lines(lines: NDArray[np.int16], smooth: NDArray[np.int16]) -> int | None:
    """How many of `lines` (outermost first, each (n, 3); `smooth` the same after the
    median) form a uniform border, at most BORDER_MAX_SIDE of them; None when every
    line is uniform (a flat image is all background, not a border)."""
    background = np.median(lines[0], axis=0)
    close = (np.abs(lines - background).max(axis=2) <= BORDER_FUZZ) | (
        np.abs(smooth - background).max(axis=2) <= BORDER_FUZZ
    )
    close = close.mean(axis=1)
    not_border = np.flatnonzero(close < BORDER_LINE_SHARE)
    if not not_border.size:
        return None
    return min(int(not_border[0]), int(BORDER_MAX_SIDE * len(lines)))


def border_box(image: Image.Image) -> tuple[int, int, int, int] | None:
    """The (left, top, right, bottom) box inside a uniform border (a frame, slide
    margin, letterbox, screenshot background), or None when there is none to trim.

    Each side has its own background colour (the median of its outermost line); top
    and bottom are found first, left and right on the rows between them."""
    width, height = image.size
    probe = image.convert("RGB")
    probe.thumbnail((BORDER_PROBE, BORDER_PROBE), Image.Resampling.BILINEAR)
    a = np.asarray(probe, dtype=np.int16)
    m = np.asarray(probe.filter(ImageFilter.MedianFilter(3)), dtype=np.int16)
    top, bottom = _uniform_lines(a, m), _uniform_lines(a[::-1], m[::-1])
    if top is None or bottom is None:
        return None
    a, m = (x[top : x.shape[0] - bottom].transpose(1, 0, 2) for x in (a, m))
    left, right = _uniform_lines(a, m), _uniform_lines(a[::-1], m[::-1])
    if left is None or right is None or top == bottom == left == right == 0:
        return None
    sx, sy = width / probe.width, height / probe.height
    box = (
        round(left * sx),
        round(top * sy),
        width - round(right * sx),
        height - round(bottom * sy),
    )
    if box[2] - box[0] < BORDER_MIN_SIDE or box[3] - box[1] < BORDER_MIN_SIDE:
        return None
    return box


def trim_border(image: Image.Image) -> Image.Image | None:
    """The image without its uniform border (see border_box); None when it has none."""
    box = border_box(image)
    return None if box is None else image.crop(box)


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
