"""Training augmentations for the detection model (seed 000 §4.3 plus the edits a
copied image typically goes through): PIL RGB -> PIL RGB, deterministic given a numpy
Generator.

Seed 000 §4.3 adds flips, rotations of -15..15 degrees, centre crops of 80-95% and
Gaussian noise; on top we re-encode as JPEG at quality 40-95 and change brightness and
contrast a little, because re-saved and re-touched copies are what a registry sees.
Each edit fires with its own probability so a view combines a few of them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

WHITE = (255, 255, 255)


@dataclass(frozen=True)
class AugmentSpec:
    """Probabilities and ranges of each edit."""

    p_flip: float = 0.5
    p_rotate: float = 0.5
    max_degrees: float = 15.0
    p_crop: float = 0.5
    crop_range: tuple[float, float] = (0.80, 0.95)  # side fraction kept
    p_random_crop: float = 0.5  # of crops: random position instead of centre
    p_noise: float = 0.3
    noise_sigma: tuple[float, float] = (2.0, 12.0)  # grey levels
    p_blur: float = 0.15  # the seed's "Gaussian kernel" may mean a blur
    blur_radius: tuple[float, float] = (0.3, 1.2)
    p_color: float = 0.5
    color_range: tuple[float, float] = (0.8, 1.2)  # brightness and contrast factors
    p_jpeg: float = 0.6
    jpeg_quality: tuple[int, int] = (40, 95)


DEFAULT_SPEC = AugmentSpec()


def augment(
    image: Image.Image, rng: np.random.Generator, spec: AugmentSpec = DEFAULT_SPEC
) -> Image.Image:
    """One random edited copy of an RGB image. The same rng state gives the same copy.

    Every random number is drawn whether or not its edit fires, so the number of draws
    per call is fixed and one image's choices never shift another's.
    """
    u = rng.random(8)
    image = image.convert("RGB") if image.mode != "RGB" else image

    if u[0] < spec.p_flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

    angle = float(rng.uniform(-spec.max_degrees, spec.max_degrees))
    if u[1] < spec.p_rotate:
        image = image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=WHITE)

    frac = float(rng.uniform(*spec.crop_range))
    pos = rng.random(2)
    if u[2] < spec.p_crop:
        image = crop(image, frac, pos if u[3] < spec.p_random_crop else None)

    brightness, contrast = rng.uniform(*spec.color_range, size=2)
    if u[4] < spec.p_color:
        image = ImageEnhance.Brightness(image).enhance(float(brightness))
        image = ImageEnhance.Contrast(image).enhance(float(contrast))

    radius = float(rng.uniform(*spec.blur_radius))
    if u[5] < spec.p_blur:
        image = image.filter(ImageFilter.GaussianBlur(radius))

    sigma = float(rng.uniform(*spec.noise_sigma))
    noise_seed = int(rng.integers(2**31))
    if u[6] < spec.p_noise:
        image = gaussian_noise(image, sigma, np.random.default_rng(noise_seed))

    quality = int(rng.integers(spec.jpeg_quality[0], spec.jpeg_quality[1] + 1))
    if u[7] < spec.p_jpeg:
        image = jpeg(image, quality)
    return image


def crop(image: Image.Image, frac: float, pos: np.ndarray | None = None) -> Image.Image:
    """Keep `frac` of each side: centred, or at relative position pos in [0,1]^2."""
    w, h = image.size
    cw, ch = max(1, round(w * frac)), max(1, round(h * frac))
    px, py = (0.5, 0.5) if pos is None else (float(pos[0]), float(pos[1]))
    left, top = round((w - cw) * px), round((h - ch) * py)
    return image.crop((left, top, left + cw, top + ch))


def gaussian_noise(
    image: Image.Image, sigma: float, rng: np.random.Generator
) -> Image.Image:
    arr = np.asarray(image, dtype=np.float32)
    noisy = arr + rng.normal(0.0, sigma, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    """Re-encode as JPEG (what a re-saved copy goes through)."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return im.convert("RGB")
